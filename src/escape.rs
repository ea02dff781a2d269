//! Showing strings that a disk image or a guest chose (a backing file name,
//! a feature name, a path derived from them): control characters are
//! written as escapes, so such a string cannot drive the terminal it is
//! printed on (move the cursor, retitle the window, hide the rest of the
//! line). Backslashes are kept, so escaping twice changes nothing more.

use std::fmt;
use std::path::Path;

/// `text`, shown with its control characters escaped.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found a char");
            match u32::from(c) {
                n @ 0..=0xff => write!(f, "\\x{n:02x}")?,
                n => write!(f, "\\u{{{n:x}}}")?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// C0 and C1 controls and DEL, and the bidirectional overrides that
/// reorder what follows them on screen.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `path` as text, shown escaped (bytes that are not UTF-8 as U+FFFD).
pub fn path(path: &Path) -> String {
    Escaped(&path.to_string_lossy()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        let shown = Escaped("base\u{1b}]0;pwned\u{7}.raw\r\n\u{9b}2J\u{202e}txt.exe").to_string();
        assert_eq!(
            shown,
            "base\\x1b]0;pwned\\x07.raw\\x0d\\x0a\\x9b2J\\u{202e}txt.exe"
        );
        assert!(!shown.chars().any(needs_escape));
        assert_eq!(Escaped(&shown).to_string(), shown, "idempotent");
        assert_eq!(
            Escaped("plain/ünïcode name").to_string(),
            "plain/ünïcode name"
        );
        assert_eq!(path(Path::new("/a/\u{1b}[2Jb")), "/a/\\x1b[2Jb");
        use std::os::unix::ffi::OsStrExt;
        let raw = std::ffi::OsStr::from_bytes(b"/a/\xff\x1b");
        assert_eq!(path(Path::new(raw)), "/a/\u{fffd}\\x1b");
    }
}
