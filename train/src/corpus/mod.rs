//! Graded synthetic corpus for training a small Llama from scratch, plus its tokenizer.
//!
//! The corpus mixes seven tasks whose *answer tokens* need different amounts of computation,
//! so that a logit lens over a trained model should show the easy answers resolved by the
//! middle layers and the hard ones only near the top. Every example is one line that starts
//! with its task keyword (10 to 60 ASCII characters, except [`Task::Needle`]'s long
//! haystacks), and records the byte ranges of its answers: the tokens whose prediction (from the previous position) is
//! fully determined by the text before them, and which evaluation scores.
//!
//! # Conventions
//!
//! * **Symbols** are upper-case letters `A`-`Z` and digits `0`-`9`. The tokenizer
//!   (see [`train_tokenizer`]) never merges a symbol with anything, so every symbol is
//!   exactly one single-byte token, whatever the vocabulary size. Symbol strings are
//!   written without spaces (`K7F2Q`); a space just before a symbol belongs to the
//!   preceding word or punctuation token (`"count "`, `" = "`), so spaces cost no tokens.
//! * **Answer ranges** ([`Example::answers`]) cover answer text only, never a leading space:
//!   one range per answer symbol, or one per answer word in [`Task::Grammar`]. [`encode`]
//!   flags every token whose byte span overlaps an answer range.
//!
//! # Tasks, from easy to hard
//!
//! | task | sample | answers |
//! |---|---|---|
//! | [`Task::Grammar`] | `the big cats are very red .` | the verb `are`, the final `.` |
//! | [`Task::Copy`] | `copy: K7F2Q \| K7F2Q` | every symbol after `\|` |
//! | [`Task::Recall`] | `recall: A3, Q8, Z1; Q8` | the value after the query key |
//! | [`Task::Needle`] | `needle: a dog is sad . K47 . two cats are red . ; K47` | the two digits after the query key |
//! | [`Task::Count`] | `count A in ABAACA = 4` | the count after `=` |
//! | [`Task::Addition`] | `add: 347+285=2360` | every digit after `=` (sum written least-significant digit first) |
//! | [`Task::Repeat`] | `repeat: K7F2QX9B \| F2QX9B` | every repeated symbol after the first |
//!
//! * **Grammar** (easy): `det [adj] noun verb [adverb] adj .` from a small fixed grammar.
//!   The verb is `is` or `are`, agreeing with the noun just before it (irregular plurals
//!   such as `men` included); the sentence always ends with ` .` after the predicate
//!   adjective. Both answers follow from the last one or two tokens: one layer suffices.
//! * **Copy** (easy-medium): 2 to 8 random symbols, `|`, then the same symbols again.
//!   Each copied symbol is found by an induction head (previous-token head + match), a
//!   two-layer circuit that does not get harder with length.
//! * **Recall** (medium): 2 to 6 key-value pairs written `A3` (distinct letter keys, digit
//!   values), then `; ` and a query key; the answer is that key's value, the token that
//!   followed the key's earlier occurrence, which an induction head fetches. The first
//!   version of this task wrote `A=3` and asked `Q?`, which one induction step cannot answer
//!   (see `recall.rs`); the first demo model, trained on it, stayed at chance (10%).
//! * **Needle** (medium, long context): a haystack of grammar sentences holding one to three
//!   facts (`K47 .`), the question `; K` at the end, the fact's two digits as answers. The
//!   lookup is recall's, over up to the trained context (`haystack_sentences`).
//! * **Repeat** (medium, opt-in): 6 to 12 distinct symbols, `|`, and the same symbols again
//!   from a random index other than the first; every repeated symbol after the first is an
//!   answer. Only a content match finds where the repeat is (an induction head); copy, whose
//!   repeat always starts at the first symbol, can also be solved by counting positions. It
//!   is the lookup recall and needle need, in every answer token (see `repeat.rs`).
//! * **Count** (medium-hard): how many times a letter occurs in a string of 3 to 9 letters
//!   drawn from 2 to 4 distinct letters (the answer is one digit, possibly `0`). Counting
//!   needs aggregating every match and turning that into a digit, which small transformers
//!   do late, if at all.
//! * **Addition** (hard): two operands of the same length n (2 or 3 digits, zero-padded, so
//!   `007` can occur) written most-significant digit first; the answer is their sum written
//!   **least-significant digit first** with exactly n + 1 digits (the last one is the carry
//!   out, `0` or `1`): `347+285=2360` because 347 + 285 = 632. Writing the sum reversed
//!   lets each answer digit depend only on earlier ones, so a small model can learn it, but
//!   the carry chain still needs depth, growing with the digit position.
//!
//! [`generate`] is deterministic for a seed and differs across seeds: train on one seed and
//! evaluate on another. Grammar has only a few thousand distinct sentences, so train and
//! evaluation sets overlap there; for the other tasks repeats are rare.

mod addition;
mod copy;
mod count;
mod grammar;
pub mod needle;
mod recall;
mod repeat;
mod tokenizer;

#[cfg(test)]
mod tests;

pub use tokenizer::{
    encode, pack, pack_encoded, pack_led, save_tokenizer, special_ids, train_tokenizer,
    try_special_ids, Encoded, BOS, EOS, PRE_TOKENIZER_REGEX,
};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// One task of the corpus; see the [module documentation](self) for the formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `copy: K7F2Q | K7F2Q`: the symbols after `|` are answers (easy-medium, an induction
    /// head suffices).
    Copy,
    /// `count A in ABAACA = 4`: the digit after `=` is the answer (medium-hard, needs
    /// aggregation over the whole string).
    Count,
    /// `recall: A=3, Q=8, Z=1; Q?8`: the digit after `?` is the answer (medium, a key
    /// lookup).
    Recall,
    /// `add: 347+285=2360`: the sum's digits after `=`, least-significant first, are the
    /// answers (hard, carries need depth).
    Addition,
    /// `the big cats are very red .`: the agreeing verb (`is`/`are`) and the final `.` are
    /// the answers (easy, local context).
    Grammar,
    /// `needle: a dog is sad . K47 . two cats are red . ; K47`: the value's two digits after
    /// the query key are the answers (a recall lookup over a long haystack).
    Needle,
    /// `repeat: K7F2QX9B | F2QX9B`: distinct symbols repeated from a random index; every
    /// repeated symbol after the first is an answer (an induction head, by content only).
    Repeat,
}

impl Task {
    /// The short-line tasks, in declaration order: the mix when a spec lists no tasks.
    /// [`Task::Needle`] (long-context) and [`Task::Repeat`] are opt-in.
    pub const SHORT: [Task; 5] = [
        Task::Copy,
        Task::Count,
        Task::Recall,
        Task::Addition,
        Task::Grammar,
    ];

    /// Every task, in declaration order.
    pub const ALL: [Task; 7] = [
        Task::Copy,
        Task::Count,
        Task::Recall,
        Task::Addition,
        Task::Grammar,
        Task::Needle,
        Task::Repeat,
    ];

    /// Lower-case name, as used in JSON specs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Task::Copy => "copy",
            Task::Count => "count",
            Task::Recall => "recall",
            Task::Addition => "addition",
            Task::Grammar => "grammar",
            Task::Needle => "needle",
            Task::Repeat => "repeat",
        }
    }

    /// Expected difficulty: `easy`, `easy-medium`, `medium`, `medium-hard` or `hard`.
    pub fn difficulty(self) -> &'static str {
        match self {
            Task::Grammar => "easy",
            Task::Copy => "easy-medium",
            Task::Recall | Task::Needle | Task::Repeat => "medium",
            Task::Count => "medium-hard",
            Task::Addition => "hard",
        }
    }

    fn sample(self, rng: &mut Rng, haystack_sentences: usize) -> Example {
        match self {
            Task::Needle => needle::sample(rng, haystack_sentences),
            Task::Copy => copy::sample(rng),
            Task::Count => count::sample(rng),
            Task::Recall => recall::sample(rng),
            Task::Addition => addition::sample(rng),
            Task::Grammar => grammar::sample(rng),
            Task::Repeat => repeat::sample(rng),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
                anyhow::anyhow!("unknown task `{s}` (expected one of {})", names.join(", "))
            })
    }
}

/// One line of the corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub task: Task,
    /// The text, without bos/eos.
    pub text: String,
    /// Byte ranges of the answers inside `text`, in order, non-empty, never starting with a
    /// space.
    pub answers: Vec<Range<usize>>,
}

/// What [`generate`] produces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    pub seed: u64,
    /// Number of examples.
    pub examples: usize,
    /// Tasks to mix; empty means the short ones ([`Task::SHORT`], every task but
    /// [`Task::Needle`]). Each entry gets an equal share (shares differ
    /// by at most one example), so listing a task twice doubles its share.
    #[serde(default)]
    pub tasks: Vec<Task>,
    /// Longest [`Task::Needle`] haystack, in grammar sentences (about six tokens each with
    /// the demo model's tokenizer); lengths are drawn log-uniformly between 2 and this.
    #[serde(default = "default_haystack_sentences")]
    pub haystack_sentences: usize,
}

fn default_haystack_sentences() -> usize {
    32
}

impl CorpusSpec {
    /// `examples` examples of `tasks` (all when empty) drawn with `seed`, needle haystacks of
    /// the default length.
    pub fn new(seed: u64, examples: usize, tasks: Vec<Task>) -> Self {
        CorpusSpec {
            seed,
            examples,
            tasks,
            haystack_sentences: default_haystack_sentences(),
        }
    }
}

/// Generates `spec.examples` examples, tasks shuffled with equal shares. Deterministic for a
/// given spec; another seed gives other data.
pub fn generate(spec: &CorpusSpec) -> Vec<Example> {
    let tasks: &[Task] = if spec.tasks.is_empty() {
        &Task::SHORT
    } else {
        &spec.tasks
    };
    let mut rng = Rng::new(spec.seed);
    let mut order: Vec<Task> = (0..spec.examples).map(|i| tasks[i % tasks.len()]).collect();
    rng.shuffle(&mut order);
    order
        .into_iter()
        .map(|t| t.sample(&mut rng, spec.haystack_sentences))
        .collect()
}

/// Needle examples generated for one training stage, beside the corpus: haystacks in the
/// evaluation's format (see [`needle::at_depth`]) whose length and fact depths the stage
/// chooses, e.g. long haystacks with a fact near the start, the distances the corpus's
/// log-uniform lengths and uniform depths rarely reach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedleLeads {
    pub seed: u64,
    /// How many to generate.
    pub examples: usize,
    /// Haystack length in grammar sentences, uniform in `(min, max)`, both included.
    pub sentences: (usize, usize),
    /// One fact per interval `(from, to)`, its depth uniform in it as a fraction of the
    /// haystack (0 first, 1 just before the question), each with its own key; the question
    /// asks for one of them, chosen uniformly. `[(0.0, 0.25)]`: one fact in the first quarter.
    pub facts: Vec<(f64, f64)>,
    /// Ask for every fact instead of one: after the haystack, one question per fact in a
    /// random order, each followed by its answer (`… ; K47 ; B12`), so a haystack carries one
    /// supervised long-range lookup per fact. The first question sits where the evaluation's
    /// single question does. Off by default (one question, the evaluation's format).
    #[serde(default)]
    pub ask_all: bool,
}

impl NeedleLeads {
    /// Why the spec cannot generate, naming the field; `None` when it can.
    pub fn problem(&self) -> Option<String> {
        let (lo, hi) = self.sentences;
        if self.examples == 0 {
            return Some("examples must be positive".into());
        }
        if lo == 0 || lo > hi {
            return Some(format!(
                "sentences ({lo}, {hi}) must be a range (min, max) with 1 <= min <= max"
            ));
        }
        if self.facts.is_empty() || self.facts.len() > 26 {
            return Some(format!(
                "facts has {} intervals; 1 to 26 (one key letter each)",
                self.facts.len()
            ));
        }
        self.facts.iter().enumerate().find_map(|(i, &(from, to))| {
            (!(0.0..=1.0).contains(&from) || !(0.0..=1.0).contains(&to) || from > to).then(|| {
                format!(
                    "facts[{i}] ({from}, {to}) must be a depth interval (from, to) with \
                     0 <= from <= to <= 1"
                )
            })
        })
    }

    /// The examples, deterministic for the spec. Call only when [`Self::problem`] is `None`.
    pub fn generate(&self) -> Vec<Example> {
        debug_assert!(self.problem().is_none(), "{:?}", self.problem());
        let mut rng = Rng::new(self.seed);
        (0..self.examples)
            .map(|_| needle::placed(&mut rng, self.sentences, &self.facts, self.ask_all))
            .collect()
    }
}

/// SplitMix64: tiny, seedable, good enough for synthetic data.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5EED_C0DE_E417_6A9F)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// `k` distinct upper-case letters, in random order.
    fn distinct_letters(&mut self, k: usize) -> Vec<u8> {
        let mut letters: Vec<u8> = (b'A'..=b'Z').collect();
        self.shuffle(&mut letters);
        letters.truncate(k);
        letters
    }

    fn digit(&mut self) -> u8 {
        b'0' + self.below(10) as u8
    }
}

/// Builds an example's text while recording answer ranges.
struct Builder {
    task: Task,
    text: String,
    answers: Vec<Range<usize>>,
}

impl Builder {
    fn new(task: Task) -> Self {
        Builder {
            task,
            text: String::new(),
            answers: Vec::new(),
        }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    /// Appends `s` as one answer range.
    fn answer(&mut self, s: &str) -> &mut Self {
        let start = self.text.len();
        self.text.push_str(s);
        self.answers.push(start..self.text.len());
        self
    }

    /// Appends each symbol of `symbols` as its own answer range.
    fn answer_symbols(&mut self, symbols: &[u8]) -> &mut Self {
        for &c in symbols {
            self.answer(&char::from(c).to_string());
        }
        self
    }

    fn symbols(&mut self, symbols: &[u8]) -> &mut Self {
        self.text.extend(symbols.iter().map(|&c| char::from(c)));
        self
    }

    fn build(&mut self) -> Example {
        Example {
            task: self.task,
            text: std::mem::take(&mut self.text),
            answers: std::mem::take(&mut self.answers),
        }
    }
}
