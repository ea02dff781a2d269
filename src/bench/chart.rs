//! The report as an SVG chart: one horizontal bar per contender, stacked by
//! phase (median of each phase), with the spread of the total (min to p95,
//! median marked) drawn over it. Missing contenders get a row saying so.
//! Hand-written SVG: a few rectangles do not need a plotting library.

use std::fmt::Write as _;
use std::path::Path;

use super::report::{BenchReport, Status};

const WIDTH: f64 = 960.0;
const LABEL_WIDTH: f64 = 250.0;
const PLOT_LEFT: f64 = LABEL_WIDTH + 10.0;
const PLOT_RIGHT: f64 = WIDTH - 30.0;
/// Where the rows start below a one-line subtitle.
const TOP: f64 = 64.0;
/// Subtitle lines: the gap between them, and the characters that fit in
/// the chart's width at 12 px (about 6.5 px a character, with margins).
const LINE: f64 = 16.0;
const SUBTITLE_CHARS: usize = 135;
const ROW: f64 = 38.0;
const BAR: f64 = 20.0;
const PALETTE: [&str; 8] = [
    "#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for about five ticks up to `max`: 1, 2 or 5 times a power of ten.
fn tick_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|m| m * power >= raw)
        .unwrap_or(10.0);
    step * power
}

/// `text` in lines of at most `width` characters, broken at spaces (a
/// word longer than that gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

pub fn render(report: &BenchReport) -> String {
    // Every distinct phase name gets a colour, in order of appearance.
    let mut phase_names: Vec<&str> = Vec::new();
    for c in report.contenders.iter().filter(|c| c.summary.is_some()) {
        for p in &c.phases {
            if !phase_names.contains(&p.as_str()) {
                phase_names.push(p);
            }
        }
    }
    let colour = |phase: &str| {
        let i = phase_names.iter().position(|p| *p == phase).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };

    let max = report
        .contenders
        .iter()
        .filter_map(|c| c.summary.as_ref())
        .map(|s| {
            s.total_ms
                .p95
                .max(s.phases_ms.iter().map(|p| p.median).sum())
        })
        .fold(0.0, f64::max);
    let step = tick_step(max);
    let axis_max = (max / step).ceil().max(1.0) * step;
    let x = |ms: f64| PLOT_LEFT + (ms / axis_max) * (PLOT_RIGHT - PLOT_LEFT);

    let subtitle = wrap(
        &format!(
            "host: {}; {} run(s), interleaved",
            report.host.describe(),
            report.runs
        ),
        SUBTITLE_CHARS,
    );
    let top = TOP + LINE * (subtitle.len().max(1) - 1) as f64;
    let rows = report.contenders.len() as f64;
    let plot_bottom = top + rows * ROW;
    let legend_y = plot_bottom + 44.0;
    let height = legend_y + 20.0 * ((phase_names.len() as f64) / 3.0).ceil() + 20.0;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="16" font-weight="bold">Boot time to goal (ms): median per phase, total min-p95</text>"#,
        PLOT_LEFT - LABEL_WIDTH
    );
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{:.1}" fill="#555">{}</text>"##,
            PLOT_LEFT - LABEL_WIDTH,
            44.0 + LINE * i as f64,
            escape(line)
        );
    }

    // Grid and axis labels.
    let mut tick = 0.0;
    while tick <= axis_max + step / 2.0 {
        let tx = x(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{tx:.1}" y1="{top}" x2="{tx:.1}" y2="{plot_bottom}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{tick}</text>"##,
            plot_bottom + 16.0
        );
        tick += step;
    }

    for (i, c) in report.contenders.iter().enumerate() {
        let y = top + i as f64 * ROW + (ROW - BAR) / 2.0;
        let mid = y + BAR / 2.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            PLOT_LEFT - 8.0,
            mid + 4.0,
            escape(&c.label)
        );
        let Some(summary) = &c.summary else {
            let what = if c.status == Status::Missing {
                "missing"
            } else {
                "failed"
            };
            let _ = writeln!(
                svg,
                r##"<text x="{PLOT_LEFT}" y="{:.1}" fill="#888" font-style="italic">{what}: {}</text>"##,
                mid + 4.0,
                escape(c.reason.as_deref().unwrap_or("no samples"))
            );
            continue;
        };
        let mut start = 0.0;
        for (phase, s) in c.phases.iter().zip(&summary.phases_ms) {
            let (x0, x1) = (x(start), x(start + s.median));
            let _ = writeln!(
                svg,
                r#"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{BAR}" fill="{}"><title>{}: {}: median {:.1} ms</title></rect>"#,
                (x1 - x0).max(0.5),
                colour(phase),
                escape(&c.label),
                escape(phase),
                s.median
            );
            start += s.median;
        }
        // The total's spread: a whisker from min to p95, a tick at the median.
        let t = &summary.total_ms;
        let (lo, hi, med) = (x(t.min), x(t.p95), x(t.median));
        let _ = writeln!(
            svg,
            r##"<g stroke="#222" stroke-width="1.5"><line x1="{lo:.1}" y1="{mid:.1}" x2="{hi:.1}" y2="{mid:.1}"/><line x1="{lo:.1}" y1="{:.1}" x2="{lo:.1}" y2="{:.1}"/><line x1="{hi:.1}" y1="{:.1}" x2="{hi:.1}" y2="{:.1}"/><line x1="{med:.1}" y1="{:.1}" x2="{med:.1}" y2="{:.1}" stroke-width="3"/></g>"##,
            mid - 5.0,
            mid + 5.0,
            mid - 5.0,
            mid + 5.0,
            y - 2.0,
            y + BAR + 2.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{:.1}</text>"#,
            hi.max(x(start)) + 6.0,
            mid + 4.0,
            t.median
        );
    }

    for (i, phase) in phase_names.iter().enumerate() {
        let lx = PLOT_LEFT - LABEL_WIDTH + (i % 3) as f64 * 300.0;
        let ly = legend_y + (i / 3) as f64 * 20.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 10.0,
            colour(phase),
            lx + 18.0,
            escape(phase)
        );
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

/// Writes the chart atomically.
pub fn write(report: &BenchReport, path: &Path) -> std::io::Result<()> {
    crate::fsutil::write_atomically(path, render(report).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(tick_step(37.0), 10.0);
        assert_eq!(tick_step(0.0), 1.0);
        assert!((tick_step(0.9) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn a_long_subtitle_wraps_within_the_width() {
        let text = "host: AMD EPYC 7B13 (2 cores), Linux 6.1.0-28-cloud-amd64, KVM PVM, QEMU 7.2.0, runc 1.1.5, kernel vmlab lean 6.1; 5 run(s), interleaved";
        let lines = wrap(text, 60);
        assert!(lines.len() > 1, "{lines:?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 60), "{lines:?}");
        assert_eq!(lines.join(" "), text);
        assert_eq!(wrap("short one", 60), ["short one"]);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
