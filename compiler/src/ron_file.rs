//! Reading RON files with errors that name the file, line and column.

use anyhow::Context;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parses the RON file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    // Optional fields take a bare value (`layerskip: (...)`) or `Some(..)`, as in pipelines.
    ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .from_str(&text)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{}: {}",
                path.display(),
                e.span.start.line,
                e.span.start.col,
                e.code
            )
        })
}

/// 1-based line and column of byte offset `at` in `text` (columns count characters).
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Byte offsets of the code in `text` (not in `//` or `/* */` comments or strings), as a mask.
fn code_mask(text: &str) -> Vec<bool> {
    let b = text.as_bytes();
    let mut mask = vec![true; b.len()];
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let end = if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            text[i..].find('\n').map_or(b.len(), |n| i + n)
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2)
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(b.len())
        } else {
            i += 1;
            continue;
        };
        for m in &mut mask[start..end] {
            *m = false;
        }
        i = end;
    }
    mask
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Where `Struct(... field: ...)` is in RON `text`: the line and column of `field` inside the
/// one struct named `name` (of the struct's name when the field is not written, or `field`
/// is `None`). `None` when the text has no such struct or more than one (the position would
/// be a guess).
pub fn locate_field(text: &str, name: &str, field: Option<&str>) -> Option<(usize, usize)> {
    let code = code_mask(text);
    let b = text.as_bytes();
    let word_at = |at: usize, w: &str| {
        text[at..].starts_with(w)
            && code[at]
            && (at == 0 || !is_ident(b[at - 1]))
            && b.get(at + w.len()).is_none_or(|&c| !is_ident(c))
    };
    let starts: Vec<(usize, usize)> = text
        .match_indices(name)
        .map(|(at, _)| at)
        .filter(|&at| word_at(at, name))
        .filter_map(|at| {
            let rest = &text[at + name.len()..];
            let open = at + name.len() + (rest.len() - rest.trim_start().len());
            (b.get(open) == Some(&b'(')).then_some((at, open))
        })
        .collect();
    let [(at, open)] = starts[..] else {
        return None;
    };
    let Some(field) = field else {
        return Some(line_col(text, at));
    };
    let mut depth = 0usize;
    for i in open..b.len() {
        if !code[i] {
            continue;
        }
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ if depth == 1
                && word_at(i, field)
                && text[i + field.len()..].trim_start().starts_with(':') =>
            {
                return Some(line_col(text, i));
            }
            _ => {}
        }
    }
    Some(line_col(text, at))
}

#[cfg(test)]
mod tests {
    use super::locate_field;

    #[test]
    fn fields_are_located_in_the_one_struct_of_that_name() {
        let text = "Pipeline(\n  // TieLayers(loops: 9) in a comment\n  passes: [\n    TieLayers(loops: 4, init: Lower),\n    DepthLora(rank: Rank(2), weights: \"TieLayers(loops: 1)\"),\n  ],\n)\n";
        assert_eq!(
            locate_field(text, "TieLayers", Some("loops")),
            Some((4, 15))
        );
        assert_eq!(locate_field(text, "TieLayers", Some("init")), Some((4, 25)));
        // Not written: the struct's own position.
        assert_eq!(locate_field(text, "TieLayers", Some("norms")), Some((4, 5)));
        assert_eq!(
            locate_field(text, "DepthLora", Some("weights")),
            Some((5, 30))
        );
        assert_eq!(locate_field(text, "DepthLora", None), Some((5, 5)));
        // A nested struct's field of the same name is not the outer one's.
        assert_eq!(
            locate_field("A(b: B(rank: 1), rank: 2)", "A", Some("rank")),
            Some((1, 18))
        );
        assert_eq!(locate_field(text, "InsertExits", Some("after")), None);
        let twice = "[TieLayers(loops: 2), TieLayers(loops: 3)]";
        assert_eq!(locate_field(twice, "TieLayers", Some("loops")), None);
    }
}
