//! Reading RON files with errors that name the file, line and column.

use anyhow::Context;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parses the RON file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    ron::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}:{}:{}: {}",
            path.display(),
            e.span.start.line,
            e.span.start.col,
            e.code
        )
    })
}
