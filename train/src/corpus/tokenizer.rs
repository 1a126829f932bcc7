//! Byte-level BPE tokenizer for the corpus, encoding with answer flags, and packing.

use super::Example;
use anyhow::{bail, ensure, Context};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Beginning-of-sequence token; id 0 in tokenizers from [`train_tokenizer`].
pub const BOS: &str = "<s>";
/// End-of-sequence token; id 1 in tokenizers from [`train_tokenizer`].
pub const EOS: &str = "</s>";

/// The pre-tokenizer's split pattern, applied before the byte-level mapping. Pieces are:
/// a single symbol (`A`-`Z`, `0`-`9`), so symbols are never merged with anything; a
/// lower-case word or a single punctuation character, each with an optional leading space,
/// and with the space just before a following symbol attached (`"count "`, `" = "`); or a
/// run of whitespace. BPE merges only happen inside a piece.
pub const PRE_TOKENIZER_REGEX: &str =
    r"[A-Z0-9]| ?[a-z]+(?: (?=[A-Z0-9]))?| ?[^\sA-Za-z0-9](?: (?=[A-Z0-9]))?|\s+";

/// 2 special tokens + 256 byte tokens.
const BASE_VOCAB: usize = 2 + 256;

/// Trains a byte-level BPE tokenizer on the examples' texts.
///
/// Pre-tokenizer: `Sequence[Split(PRE_TOKENIZER_REGEX, Isolated), ByteLevel(add_prefix_space
/// = false, trim_offsets = false, use_regex = false)]`; decoder: `ByteLevel`; no normalizer
/// and a post-processor that puts [`BOS`] before a text encoded with special tokens
/// (`<s> $A`, as Llama's tokenizers do: prompts typed into `run`, `serve` or the explorer
/// start like the training examples; [`encode`] encodes without special tokens and adds
/// bos/eos itself). The trainer starts from the full 256-byte alphabet, so any text
/// round-trips, and adds [`BOS`] (id 0) and [`EOS`] (id 1). `vocab_size` is an upper bound
/// (at least 258): training stops early once every word of the corpus is one token.
pub fn train_tokenizer(examples: &[Example], vocab_size: usize) -> anyhow::Result<Tokenizer> {
    ensure!(
        vocab_size >= BASE_VOCAB,
        "vocab_size {vocab_size} is below {BASE_VOCAB} (2 special tokens + 256 bytes)"
    );
    let split = Split::new(
        SplitPattern::Regex(PRE_TOKENIZER_REGEX.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(anyhow::Error::msg)?;
    let byte_level = ByteLevel::new(false, false, false);
    let pre_tokenizer = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ]);
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(byte_level));
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .initial_alphabet(alphabet)
        .special_tokens(vec![
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
        ])
        .build()
        .into();
    tok.train(&mut trainer, examples.iter().map(|e| e.text.as_str()))
        .map_err(anyhow::Error::msg)
        .context("training the BPE tokenizer")?;
    let (bos, eos) = try_special_ids(&tok)?;
    ensure!(
        (bos, eos) == (0, 1),
        "expected bos/eos ids 0/1, got {bos}/{eos}"
    );
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS}:1 $B:1")))
        .map_err(anyhow::Error::msg)?
        .special_tokens(vec![(BOS, bos)])
        .build()
        .context("the tokenizer's post-processor")?;
    tok.with_post_processor(Some(template));
    Ok(tok)
}

/// Ids of [`BOS`] and [`EOS`]: `(0, 1)` for tokenizers from [`train_tokenizer`]. Falls back
/// to `(0, 1)` for a tokenizer that lacks them; use [`try_special_ids`] to catch that.
pub fn special_ids(tok: &Tokenizer) -> (u32, u32) {
    try_special_ids(tok).unwrap_or((0, 1))
}

/// Ids of [`BOS`] and [`EOS`], or an error if the tokenizer lacks either.
pub fn try_special_ids(tok: &Tokenizer) -> anyhow::Result<(u32, u32)> {
    let id = |t: &str| {
        tok.token_to_id(t)
            .with_context(|| format!("tokenizer has no `{t}` token"))
    };
    Ok((id(BOS)?, id(EOS)?))
}

/// Writes the tokenizer as pretty JSON, atomically: a temporary file in the same folder,
/// renamed over `path`.
pub fn save_tokenizer(tok: &Tokenizer, path: &Path) -> anyhow::Result<()> {
    let json = tok.to_string(true).map_err(anyhow::Error::msg)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(json.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// An encoded example or packed row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// `answer[i]`: token `i` is (part of) an answer, i.e. a position whose prediction from
    /// position `i - 1` is scored. Same length as `ids`.
    pub answer: Vec<bool>,
}

/// `bos`, the tokens of `ex.text`, `eos`. A token is flagged as an answer when its byte span
/// overlaps one of `ex.answers`; bos and eos never are.
pub fn encode(tok: &Tokenizer, ex: &Example) -> anyhow::Result<Encoded> {
    let (bos, eos) = try_special_ids(tok)?;
    let enc = tok
        .encode(ex.text.as_str(), false)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("encoding {:?}", ex.text))?;
    let mut ids = Vec::with_capacity(enc.len() + 2);
    let mut answer = Vec::with_capacity(enc.len() + 2);
    ids.push(bos);
    answer.push(false);
    for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
        ids.push(id);
        answer.push(ex.answers.iter().any(|r| r.start < end && start < r.end));
    }
    ids.push(eos);
    answer.push(false);
    Ok(Encoded { ids, answer })
}

/// Packs the encoded examples into rows of `seq_len + 1` tokens for language modelling
/// (inputs `row[..seq_len]`, targets `row[1..]`); see [`pack_encoded`] for the layout.
pub fn pack(
    tok: &Tokenizer,
    examples: &[Example],
    seq_len: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let encoded = examples
        .iter()
        .map(|e| encode(tok, e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (_, eos) = try_special_ids(tok)?;
    Ok(pack_encoded(&encoded, seq_len, eos)?
        .into_iter()
        .map(|r| r.ids)
        .collect())
}

/// How many later pieces [`pack_encoded`] tries when the next one does not fit a row.
const FILL_LOOKAHEAD: usize = 256;

/// Packs encoded examples (answer flags kept, to score answers only) into rows of
/// `seq_len + 1` tokens, each row starting at an example's first token, so that an example
/// that fits a row is never cut (a long-context example keeps its question with its facts):
///
/// * examples are placed in order; when the next one does not fit the room left in the
///   current row, the row is first filled with later examples that fit (first fit among the
///   next 256), then closed, the gap that is left padded with `pad` (not an answer);
/// * an example longer than a row is cut into full rows, its tail placed like an example;
/// * the last row is padded as well; nothing is dropped.
///
/// Padding is scored by the training loss like any token; with short examples to fill gaps
/// it stays a small share of the tokens (a test bounds it for the corpus).
pub fn pack_encoded(encoded: &[Encoded], seq_len: usize, pad: u32) -> anyhow::Result<Vec<Encoded>> {
    if seq_len == 0 {
        bail!("seq_len must be positive");
    }
    let width = seq_len + 1;
    // Pieces no longer than a row: full rows of over-long examples go straight out.
    let mut rows: Vec<Encoded> = Vec::new();
    let mut pieces: Vec<(&[u32], &[bool])> = Vec::new();
    for e in encoded {
        let mut start = 0;
        while e.ids.len() - start > width {
            rows.push(Encoded {
                ids: e.ids[start..start + width].to_vec(),
                answer: e.answer[start..start + width].to_vec(),
            });
            start += width;
        }
        if start < e.ids.len() {
            pieces.push((&e.ids[start..], &e.answer[start..]));
        }
    }
    let mut placed = vec![false; pieces.len()];
    let mut row = Encoded {
        ids: Vec::with_capacity(width),
        answer: Vec::with_capacity(width),
    };
    let close = |row: &mut Encoded, rows: &mut Vec<Encoded>| {
        if row.ids.is_empty() {
            return;
        }
        row.answer.resize(width, false);
        row.ids.resize(width, pad);
        rows.push(std::mem::replace(
            row,
            Encoded {
                ids: Vec::with_capacity(width),
                answer: Vec::with_capacity(width),
            },
        ));
    };
    for i in 0..pieces.len() {
        if placed[i] {
            continue;
        }
        let (ids, answer) = pieces[i];
        if row.ids.len() + ids.len() > width {
            let ahead = (i + 1..pieces.len())
                .filter(|&j| !placed[j])
                .take(FILL_LOOKAHEAD)
                .collect::<Vec<_>>();
            for j in ahead {
                let (ids, answer) = pieces[j];
                if row.ids.len() + ids.len() <= width {
                    row.ids.extend_from_slice(ids);
                    row.answer.extend_from_slice(answer);
                    placed[j] = true;
                }
            }
            close(&mut row, &mut rows);
        }
        row.ids.extend_from_slice(ids);
        row.answer.extend_from_slice(answer);
        placed[i] = true;
    }
    close(&mut row, &mut rows);
    Ok(rows)
}

/// Packs rows of `seq_len + 1` tokens that each start with one of `leads` (in order) and
/// fill the room left with `fill` examples (first fit among the next 256 not yet used,
/// each used at most once), the gap that is left padded with `pad`. A lead longer than a
/// row is cut into full rows, its tail leading a row. Returns the rows and how many `fill`
/// examples they hold; fill examples left over are not trained on.
///
/// A long-context stage trains this way on its long examples alone at the head of each
/// row while the room they leave carries the short tasks rather than padding.
pub fn pack_led(
    leads: &[Encoded],
    fill: &[Encoded],
    seq_len: usize,
    pad: u32,
) -> anyhow::Result<(Vec<Encoded>, usize)> {
    if seq_len == 0 {
        bail!("seq_len must be positive");
    }
    let width = seq_len + 1;
    let mut rows = Vec::new();
    let mut placed = vec![false; fill.len()];
    let mut first_free = 0;
    let mut used = 0;
    for lead in leads {
        let mut start = 0;
        while lead.ids.len() - start > width {
            rows.push(Encoded {
                ids: lead.ids[start..start + width].to_vec(),
                answer: lead.answer[start..start + width].to_vec(),
            });
            start += width;
        }
        if start == lead.ids.len() {
            continue;
        }
        let mut row = Encoded {
            ids: Vec::with_capacity(width),
            answer: Vec::with_capacity(width),
        };
        row.ids.extend_from_slice(&lead.ids[start..]);
        row.answer.extend_from_slice(&lead.answer[start..]);
        while first_free < fill.len() && placed[first_free] {
            first_free += 1;
        }
        let ahead = (first_free..fill.len())
            .filter(|&j| !placed[j])
            .take(FILL_LOOKAHEAD)
            .collect::<Vec<_>>();
        for j in ahead {
            if row.ids.len() + fill[j].ids.len() <= width {
                row.ids.extend_from_slice(&fill[j].ids);
                row.answer.extend_from_slice(&fill[j].answer);
                placed[j] = true;
                used += 1;
            }
        }
        row.answer.resize(width, false);
        row.ids.resize(width, pad);
        rows.push(row);
    }
    Ok((rows, used))
}
