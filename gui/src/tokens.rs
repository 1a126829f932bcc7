//! Prompt text to token ids and ids back to text, through the checkpoint's `tokenizer.json`
//! (ids separated by spaces when the model has none).

use std::path::Path;
use tokenizers::Tokenizer;

/// A model's tokenizer, if it ships one.
pub struct TokenText {
    tokenizer: Option<Tokenizer>,
}

impl TokenText {
    /// Loads `tokenizer.json` when `path` is given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let tokenizer = match path {
            Some(p) => {
                let mut t =
                    Tokenizer::from_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                t.with_padding(None);
                Some(t)
            }
            None => None,
        };
        Ok(TokenText { tokenizer })
    }

    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// The prompt's ids (no padding). Without a tokenizer the prompt must be ids.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let ids: Vec<u32> = match &self.tokenizer {
            Some(t) => {
                let enc = t
                    .encode(text, true)
                    .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
                enc.get_ids()
                    .iter()
                    .zip(enc.get_attention_mask())
                    .filter(|(_, &m)| m == 1)
                    .map(|(&id, _)| id)
                    .collect()
            }
            None => text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<u32>().map_err(|_| {
                        anyhow::anyhow!(
                            "the model has no tokenizer.json, so prompts are token ids; \"{s}\" is not one"
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        if ids.is_empty() {
            anyhow::bail!("the prompt has no tokens");
        }
        Ok(ids)
    }

    /// One token as text (special tokens included, so nothing vanishes).
    pub fn token(&self, id: u32) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>")),
            None => id.to_string(),
        }
    }

    /// Several tokens as text.
    pub fn text(&self, ids: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(ids, true).unwrap_or_default(),
            None => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
        }
    }
}

/// Prompts from a file: one per line, blank lines skipped.
pub fn prompts_from_text(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn demo_tokenizer_round_trips() {
        let dir = exitgraph::pipeline::demo_model_dir();
        let t = TokenText::load(Some(&dir.join("tokenizer.json"))).unwrap();
        let ids = t.encode("copy: K7F2Q | K").unwrap();
        // The shipped tokenizer starts a prompt with <s> (id 0), as training examples start.
        assert_eq!(ids[0], 0);
        assert!(ids.len() > 1);
        let text: String = ids.iter().map(|&i| t.token(i)).collect();
        assert!(text.contains("K7F2Q"), "{text}");
    }

    #[test]
    fn without_a_tokenizer_prompts_are_ids() {
        let t = TokenText::load(None).unwrap();
        assert_eq!(t.encode("1 2, 3").unwrap(), vec![1, 2, 3]);
        assert!(t.encode("one").is_err());
        assert!(t.encode("  ").is_err());
        assert_eq!(t.token(7), "7");
    }

    #[test]
    fn prompt_files_skip_blank_lines() {
        assert_eq!(prompts_from_text("a\n\n  \nb c \n"), vec!["a", "b c"]);
    }
}
