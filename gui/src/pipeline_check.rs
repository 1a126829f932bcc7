//! Checks pipeline text as it is typed: the first syntax or field error, with its line and
//! column, and where that is in the text.

use exitgraph::pipeline::{Pipeline, PipelineError};
use std::path::Path;

/// A problem in the pipeline text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextError {
    /// 1-based; 0 when the error has no position (a field's value).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for TextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(f, "{}", self.message)
        }
    }
}

/// Parses `text` as a pipeline file at `path`.
pub fn check(text: &str, path: &Path) -> Result<Pipeline, TextError> {
    Pipeline::parse(text, path).map_err(|e| match e {
        PipelineError::Parse {
            line,
            column,
            message,
            ..
        } => TextError {
            line,
            column,
            message,
        },
        other => TextError {
            line: 0,
            column: 0,
            message: other.to_string(),
        },
    })
}

/// Byte offset of 1-based `line`:`column` (columns count characters) in `text`, clamped to
/// the text.
pub fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let col = column.saturating_sub(1);
            let within = l
                .char_indices()
                .nth(col)
                .map_or(l.trim_end_matches('\n').len(), |(b, _)| b);
            return offset + within;
        }
        offset += l.len();
    }
    text.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_demo_pipeline_parses() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.ron"),
        )
        .unwrap();
        assert!(check(&text, Path::new("demo.ron")).is_ok());
    }

    #[test]
    fn a_syntax_error_has_its_line_and_column() {
        let text = "Pipeline(\n    passes: [TruncateLayers(keep: 3],\n)\n";
        let e = check(text, Path::new("p.ron")).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.column > 1);
        assert!(e.to_string().starts_with("2:"));
    }

    #[test]
    fn an_unknown_field_is_reported() {
        let e = check("Pipeline(pases: [])", Path::new("p.ron")).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("pases"), "{}", e.message);
    }

    #[test]
    fn a_bad_version_has_no_position() {
        let e = check("Pipeline(version: 9)", Path::new("p.ron")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(e.message.contains("version"));
    }

    #[test]
    fn offsets() {
        let t = "ab\ncdé\nf";
        assert_eq!(offset_of(t, 1, 1), 0);
        assert_eq!(offset_of(t, 2, 2), 4);
        assert_eq!(offset_of(t, 2, 4), 7); // past the end of the line: its end
        assert_eq!(offset_of(t, 3, 1), 8);
        assert_eq!(offset_of(t, 9, 1), t.len());
    }
}
