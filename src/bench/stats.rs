//! Order statistics of a set of samples: what the tables and charts show.

use serde::{Deserialize, Serialize};

/// Minimum, median and 95th percentile of some samples (in their unit).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    /// `None` for no samples. NaNs are ignored.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Summary {
            min: sorted[0],
            median,
            p95: percentile(&sorted, 95.0),
            max: sorted[n - 1],
            count: n,
        })
    }
}

/// The nearest-rank percentile of sorted samples: the smallest sample with
/// at least `p` percent of the samples at or below it (a sample that
/// happened, never an interpolation).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_counts() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (s.min, s.median, s.p95, s.max, s.count),
            (1.0, 3.0, 5.0, 5.0, 3)
        );
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.p95, 4.0);
    }

    #[test]
    fn p95_is_nearest_rank() {
        // 1..=100: the 95th value is 95; 1..=20: ceil(19) = 19th value.
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Summary::of(&hundred).unwrap().p95, 95.0);
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(Summary::of(&twenty).unwrap().p95, 19.0);
        assert_eq!(Summary::of(&[7.0]).unwrap().p95, 7.0);
    }

    #[test]
    fn empty_and_nan() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(Summary::of(&[f64::NAN, 2.0]).unwrap().count, 1);
    }
}
