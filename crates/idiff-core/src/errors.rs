//! Error messages as the front ends show them.

use std::fmt::Display;

/// `e` with its causes (`{:#}`), on one line: every run of whitespace, newlines included,
/// becomes one space.
pub fn one_line(e: impl Display) -> String {
    format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn joins_lines_and_causes() {
        let e = anyhow::anyhow!("inner\n  detail").context("outer.bin: unreadable");
        assert_eq!(one_line(&e), "outer.bin: unreadable: inner detail");
        assert_eq!(one_line("a\n\tb  c"), "a b c");
    }
}
