//! Path globs for reservations: matching a path, and deciding whether two globs can match a
//! common path (so overlapping reservations are refused exactly, not by a prefix guess).
//!
//! Syntax, relative to the repository root: `*` any characters but `/`, `?` one character but
//! `/`, `**` any characters including `/` (a whole `**/` segment also matches nothing), and a
//! trailing `/` means everything below (`src/` is `src/**`). Everything else is literal.
//! Both questions are answered by one search over pairs of positions in the two patterns (a
//! path is a pattern without wildcards), which visits each pair at most once.

use std::collections::HashSet;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Token {
    /// One literal character.
    Char(char),
    /// `?`: one character other than `/`.
    One,
    /// `*`: any run of characters other than `/`.
    Star,
    /// `**`: any run of characters.
    Any,
    /// Zero-width marker before a `**/` segment: the three tokens after it (`**`, `/`) may
    /// instead match nothing, so `a/**/b` matches `a/b` but not `a/xb`.
    Segment,
}

/// A parsed glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Token>,
}

impl std::fmt::Display for Glob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Glob {
    /// Parses a glob relative to the repository root.
    pub fn parse(text: &str) -> Result<Glob> {
        let bad = |why: &str| {
            Error::bad_input(format!(
                "invalid path pattern {text:?}: {why}; write it relative to the repository root, e.g. src/db/** or Cargo.lock"
            ))
        };
        if text.is_empty() || text.len() > 1024 {
            return Err(bad("it is empty or too long"));
        }
        if text.starts_with('/') {
            return Err(bad("it is absolute"));
        }
        if text.split('/').any(|part| part == ".." || part == ".") {
            return Err(bad("it contains '.' or '..'"));
        }
        if text.chars().any(|c| c.is_control()) {
            return Err(bad("it contains control characters"));
        }
        let mut full = text.to_string();
        if full.ends_with('/') {
            full.push_str("**");
        }
        let mut tokens = Vec::new();
        let mut chars = full.chars().peekable();
        while let Some(c) = chars.next() {
            let token = match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    if chars.peek() == Some(&'/') {
                        tokens.push(Token::Segment);
                    }
                    Token::Any
                }
                '*' => Token::Star,
                '?' => Token::One,
                c => Token::Char(c),
            };
            tokens.push(token);
        }
        Ok(Glob {
            text: text.to_string(),
            tokens,
        })
    }

    /// Whether `path` (relative, `/`-separated) matches.
    pub fn matches(&self, path: &str) -> bool {
        let literal: Vec<Token> = path.chars().map(Token::Char).collect();
        intersect(&self.tokens, &literal)
    }

    /// Whether some path matches both globs.
    pub fn overlaps(&self, other: &Glob) -> bool {
        intersect(&self.tokens, &other.tokens)
    }
}

/// Whether tokens `a` and `b` can produce a common string.
fn intersect(a: &[Token], b: &[Token]) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        if !seen.insert((i, j)) {
            continue;
        }
        if i == a.len() && j == b.len() {
            return true;
        }
        // Moves that consume nothing: a wildcard run matching the empty string, or skipping a
        // whole `**/` segment.
        for (next_i, next_j) in skips(a, i)
            .map(|n| (n, j))
            .chain(skips(b, j).map(|n| (i, n)))
        {
            stack.push((next_i, next_j));
        }
        // Moves where both consume one common character.
        if let (Some(&x), Some(&y)) = (a.get(i), b.get(j))
            && x != Token::Segment
            && y != Token::Segment
            && compatible(x, y)
        {
            let next = |k: usize, t: Token| {
                if matches!(t, Token::Star | Token::Any) {
                    k
                } else {
                    k + 1
                }
            };
            stack.push((next(i, x), next(j, y)));
        }
    }
    false
}

/// Positions reachable from `k` without consuming a character.
fn skips(tokens: &[Token], k: usize) -> impl Iterator<Item = usize> {
    let next = matches!(
        tokens.get(k),
        Some(Token::Star | Token::Any | Token::Segment)
    )
    .then_some(k + 1);
    // Past `Segment`, `**` and `/`.
    let past_segment = (tokens.get(k) == Some(&Token::Segment)).then_some(k + 3);
    next.into_iter().chain(past_segment)
}

/// Whether some single character satisfies both tokens.
fn compatible(x: Token, y: Token) -> bool {
    use Token::*;
    match (x, y) {
        (Char(a), Char(b)) => a == b,
        (Char(c), One | Star) | (One | Star, Char(c)) => c != '/',
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> Glob {
        Glob::parse(text).unwrap()
    }

    #[test]
    fn matching() {
        assert!(glob("Cargo.lock").matches("Cargo.lock"));
        assert!(!glob("Cargo.lock").matches("Cargo.lockx"));
        assert!(glob("src/*.rs").matches("src/main.rs"));
        assert!(!glob("src/*.rs").matches("src/db/mod.rs"));
        assert!(glob("src/**").matches("src/db/mod.rs"));
        assert!(glob("src/").matches("src/db/mod.rs"));
        assert!(glob("src/**/mod.rs").matches("src/mod.rs"));
        assert!(glob("src/**/mod.rs").matches("src/a/b/mod.rs"));
        assert!(!glob("src/**/mod.rs").matches("src/a/bmod.rs"));
        assert!(!glob("src/**/mod.rs").matches("src/xmod.rs"));
        assert!(glob("**/mod.rs").matches("mod.rs"));
        assert!(glob("**/mod.rs").matches("a/mod.rs"));
        assert!(!glob("**/mod.rs").matches("amod.rs"));
        assert!(glob("?.txt").matches("a.txt"));
        assert!(!glob("?.txt").matches("/.txt"));
        assert!(glob("**").matches("anything/at/all"));
    }

    #[test]
    fn overlapping() {
        let overlap = |a: &str, b: &str| glob(a).overlaps(&glob(b)) && glob(b).overlaps(&glob(a));
        assert!(overlap("src/**", "src/db/mod.rs"));
        assert!(overlap("src/*.rs", "src/m*"));
        assert!(overlap("src/**/*.rs", "src/db/*"));
        assert!(overlap("**", "README.md"));
        assert!(!overlap("src/*.rs", "src/*.md"));
        assert!(!overlap("src/*.rs", "src/db/*.rs"));
        assert!(!overlap("docs/**", "src/**"));
        assert!(!overlap("a?", "abc"));
        assert!(overlap("a/**/b", "a/b"));
        assert!(!overlap("a/**/b", "a/xb"));
        assert!(overlap("a/**/b", "a/*/b"));
    }

    #[test]
    fn rejects_what_cannot_be_a_repository_path() {
        for bad in ["", "/etc/passwd", "../up", "a/./b", "a\nb"] {
            assert!(Glob::parse(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Patterns from a small alphabet, so that wildcards and separators meet often.
    fn pattern() -> impl Strategy<Value = String> {
        "[ab./*?]{1,12}"
    }

    /// A path `glob` matches, made by filling each wildcard from `fills`.
    fn instance_of(glob: &Glob, fills: &[String]) -> String {
        let mut fills = fills.iter().cycle();
        let mut path = String::new();
        for token in &glob.tokens {
            let fill = fills.next().map_or("", String::as_str);
            match token {
                Token::Char(c) => path.push(*c),
                Token::One => path.push(fill.chars().find(|c| *c != '/').unwrap_or('a')),
                Token::Star => path.extend(fill.chars().filter(|c| *c != '/')),
                Token::Any => path.push_str(fill),
                Token::Segment => {}
            }
        }
        path
    }

    /// A pattern that matches `path`: each character kept, turned into `?`, followed by `*`, or
    /// replaced by `**`, as `choices` say.
    fn generalize(path: &str, choices: &[u8]) -> String {
        let mut choices = choices.iter().cycle();
        let mut pattern = String::new();
        for c in path.chars() {
            match choices.next().copied().unwrap_or(0) % 4 {
                1 if c != '/' => pattern.push('?'),
                2 => {
                    pattern.push(c);
                    pattern.push('*');
                }
                3 => pattern.push_str("**"),
                _ => pattern.push(c),
            }
        }
        pattern
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parsing_and_matching_never_panic(text in any::<String>(), path in any::<String>()) {
            if let Ok(glob) = Glob::parse(&text) {
                let _ = glob.matches(&path);
                prop_assert!(glob.overlaps(&glob), "{text:?} overlaps itself");
            }
        }

        #[test]
        fn overlaps_is_symmetric(a in pattern(), b in pattern()) {
            if let (Ok(a), Ok(b)) = (Glob::parse(&a), Glob::parse(&b)) {
                prop_assert_eq!(a.overlaps(&b), b.overlaps(&a), "{} and {}", a, b);
            }
        }

        #[test]
        fn a_path_matching_both_globs_means_they_overlap(
            a in pattern(),
            b in pattern(),
            fills in proptest::collection::vec("[ab./]{0,3}", 1..8),
        ) {
            let (Ok(a), Ok(b)) = (Glob::parse(&a), Glob::parse(&b)) else {
                return Ok(());
            };
            let path = instance_of(&a, &fills);
            prop_assert!(a.matches(&path), "{} matches its instance {:?}", a, path);
            if b.matches(&path) {
                prop_assert!(a.overlaps(&b), "{} and {} both match {:?}", a, b, path);
            }
            // The path as a literal pattern (when it is one) overlaps the glob it came from.
            if let Ok(literal) = Glob::parse(&path) {
                prop_assert!(a.overlaps(&literal), "{} and {:?}", a, path);
            }
        }

        #[test]
        fn a_glob_overlaps_every_generalization_of_a_path_it_matches(
            a in pattern(),
            fills in proptest::collection::vec("[ab./]{0,3}", 1..8),
            choices in proptest::collection::vec(any::<u8>(), 1..16),
        ) {
            let Ok(a) = Glob::parse(&a) else {
                return Ok(());
            };
            let path = instance_of(&a, &fills);
            let Ok(b) = Glob::parse(&generalize(&path, &choices)) else {
                return Ok(());
            };
            prop_assert!(b.matches(&path), "{} matches {:?}", b, path);
            prop_assert!(a.overlaps(&b), "{} and {} both match {:?}", a, b, path);
            prop_assert!(b.overlaps(&a), "{} and {} both match {:?}", b, a, path);
        }
    }
}
