//! The `key = value` files vmlab keeps its state in (a VM's `vm.conf`, a
//! network's definition): one reader of their lines for every parser.

/// One `key = value` line, both sides trimmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// 1-based, for error messages.
    pub line: usize,
    pub key: &'a str,
    pub value: &'a str,
}

/// The entries of `text` in order, blank lines and `#` comments skipped;
/// a line without `=` is an error: its number and the message to show.
pub fn entries(text: &str) -> impl Iterator<Item = Result<Entry<'_>, (usize, String)>> {
    text.lines().enumerate().filter_map(|(index, raw)| {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        Some(match line.split_once('=') {
            Some((key, value)) => Ok(Entry {
                line: index + 1,
                key: key.trim(),
                value: value.trim(),
            }),
            None => Err((index + 1, format!("expected 'key = value', found '{line}'"))),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_skip_blanks_and_comments_and_number_lines() {
        let got: Vec<_> = entries("# head\n\n a = 1 \nb=two words\nbad line\n").collect();
        assert_eq!(
            got,
            [
                Ok(Entry {
                    line: 3,
                    key: "a",
                    value: "1"
                }),
                Ok(Entry {
                    line: 4,
                    key: "b",
                    value: "two words"
                }),
                Err((5, "expected 'key = value', found 'bad line'".to_string())),
            ]
        );
    }
}
