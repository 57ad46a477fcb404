//! Printing text that came from a repository.
//!
//! Labels, lock holders' host names and purposes, source descriptions and ids are written by
//! whoever could write to the repository. Printed raw, a control character in them can move the
//! cursor, recolour or clear a terminal, or forge extra output lines; bidirectional-override
//! characters can make text read differently than it is. [`Escaped`] prints such characters as
//! visible escapes (`\n`, `\u{1b}`) and leaves everything else as it is. JSON output needs no
//! help: the JSON encoder escapes control characters itself.

use std::borrow::Cow;
use std::fmt;

/// Displays a string with control and bidirectional-formatting characters escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escaped<'a>(pub &'a str);

/// Whether `c` must not reach a terminal raw: C0/C1 controls, DEL, and the Unicode
/// bidirectional embeddings, overrides and isolates (U+202A..=U+202E, U+2066..=U+2069).
pub fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

/// `s` with control and bidirectional-formatting characters escaped; borrowed when clean.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.chars().any(needs_escape) {
        Cow::Owned(Escaped(s).to_string())
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_are_escaped_plain_text_is_not() {
        assert!(matches!(escape("db-0 on node/1 ünïcode"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\nb\tc\u{1b}[2Jd\u{7f}\u{202e}e"),
            "a\\nb\\tc\\u{1b}[2Jd\\u{7f}\\u{202e}e"
        );
        assert_eq!(Escaped("x\r").to_string(), "x\\r");
    }
}
