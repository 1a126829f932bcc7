//! [`Task::Needle`]: long-context key → value retrieval,
//! `needle: a dog is sad . K47 . these cats are not red . … ; K47`.
//!
//! A haystack of grammar sentences (words only: no upper-case letter or digit occurs in it)
//! holds one to three facts, each a distinct key letter directly followed by a two-digit
//! value (`K47 .`), placed between sentences at independent random depths. The question at
//! the end repeats one fact's key after `; `, and the two value digits are the answers. The
//! haystack length in sentences is log-uniform between 2 and the corpus's
//! `haystack_sentences` (a grammar sentence is about six tokens with the demo model's
//! tokenizer), so most examples are short and a few long. [`at_depth`] builds the evaluation's single-fact
//! haystacks with the fact at a chosen depth.

use super::{grammar, Builder, Example, Rng, Task};

/// One fact: a key letter and its two value digits.
type Fact = (u8, [u8; 2]);

pub(super) fn sample(rng: &mut Rng, max_sentences: usize) -> Example {
    let max = max_sentences.max(2) as f64;
    // Log-uniform in [2, max]: exp of a uniform draw between ln 2 and ln max.
    let u = rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
    let sentences = (2f64.ln() + u * (max.ln() - 2f64.ln())).exp().round() as usize;
    let facts_count = rng.between(1, 3);
    let keys = rng.distinct_letters(facts_count);
    let facts: Vec<(usize, Fact)> = keys
        .iter()
        .map(|&k| (rng.between(0, sentences), (k, [rng.digit(), rng.digit()])))
        .collect();
    let query = facts[rng.below(facts.len())].1;
    build(rng, sentences, &facts, &[query])
}

/// A haystack of `sentences` grammar sentences with one fact before sentence
/// `round(depth · sentences)` (`depth` in `[0, 1]`: 0 first, 1 last, just before the
/// question), asking for that fact.
pub fn at_depth(seed: u64, sentences: usize, depth: f64) -> Example {
    let mut rng = Rng::new(seed);
    let key = rng.distinct_letters(1)[0];
    let fact = (key, [rng.digit(), rng.digit()]);
    let at = (depth.clamp(0.0, 1.0) * sentences as f64).round() as usize;
    build(&mut rng, sentences, &[(at, fact)], &[fact])
}

/// The text: `needle: `, the sentences with each fact placed before the sentence of its index
/// (index `sentences`: after the last one), then for each query ` ; `, its key and its value
/// (the value digits are the answers).
fn build(rng: &mut Rng, sentences: usize, facts: &[(usize, Fact)], queries: &[Fact]) -> Example {
    let mut b = Builder::new(Task::Needle);
    b.push("needle:");
    for s in 0..=sentences {
        for &(_, (key, value)) in facts.iter().filter(|(at, _)| *at == s) {
            b.push(" ").symbols(&[key, value[0], value[1]]).push(" .");
        }
        if s < sentences {
            b.push(" ").push(&grammar::sample(rng).text);
        }
    }
    for query in queries {
        b.push(" ; ").symbols(&[query.0]).answer_symbols(&query.1);
    }
    b.build()
}

/// A haystack in [`at_depth`]'s format whose length (in sentences) is drawn uniformly from
/// the inclusive `sentences` range, with one fact for each interval of `depths`, its depth
/// drawn uniformly in it (distinct keys), asking for one of them chosen uniformly, or with
/// `ask_all` for every one in a uniformly shuffled order: the long-range lookups a training
/// stage adds on purpose ([`super::NeedleLeads`]).
pub(super) fn placed(
    rng: &mut Rng,
    sentences: (usize, usize),
    depths: &[(f64, f64)],
    ask_all: bool,
) -> Example {
    let n = rng.between(sentences.0, sentences.1);
    let at: Vec<usize> = depths
        .iter()
        .map(|&(from, to)| {
            let u = rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
            let d = (from + u * (to - from)).clamp(0.0, 1.0);
            (d * n as f64).round() as usize
        })
        .collect();
    let keys = rng.distinct_letters(depths.len());
    let facts: Vec<(usize, Fact)> = at
        .into_iter()
        .zip(keys)
        .map(|(at, key)| (at, (key, [rng.digit(), rng.digit()])))
        .collect();
    // One fact is asked for without a draw (the stream stays that of a single-fact spec).
    let queries = if ask_all {
        let mut all: Vec<Fact> = facts.iter().map(|f| f.1).collect();
        rng.shuffle(&mut all);
        all
    } else if facts.len() == 1 {
        vec![facts[0].1]
    } else {
        vec![facts[rng.below(facts.len())].1]
    };
    build(rng, n, &facts, &queries)
}
