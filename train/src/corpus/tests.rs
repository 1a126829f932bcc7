use super::*;
use std::collections::{BTreeMap, BTreeSet};
use tokenizers::Tokenizer;

fn spec(seed: u64, examples: usize) -> CorpusSpec {
    CorpusSpec::new(seed, examples, Vec::new())
}

fn small_tokenizer() -> (Vec<Example>, Tokenizer) {
    let examples = generate(&spec(7, 400));
    let tok = train_tokenizer(&examples, 300).unwrap();
    (examples, tok)
}

fn token_texts(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    let enc = tok.encode(ex.text.as_str(), false).unwrap();
    enc.get_offsets()
        .iter()
        .map(|&(s, e)| ex.text[s..e].to_string())
        .collect()
}

fn answer_strings(ex: &Example) -> Vec<&str> {
    ex.answers.iter().map(|r| &ex.text[r.clone()]).collect()
}

#[test]
fn generation_is_deterministic_and_seed_dependent() {
    let a = generate(&spec(1, 300));
    assert_eq!(a, generate(&spec(1, 300)));
    let b = generate(&spec(2, 300));
    assert_ne!(a, b);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 30, "{same} identical examples across seeds");
}

#[test]
fn answers_are_well_formed() {
    for ex in generate(&CorpusSpec::new(3, 2000, Task::ALL.to_vec())) {
        assert!(ex.text.is_ascii());
        let length = if ex.task == Task::Needle {
            10..=1200
        } else {
            10..=60
        };
        assert!(
            length.contains(&ex.text.len()),
            "{:?} has {} chars",
            ex.text,
            ex.text.len()
        );
        assert!(ex.text.starts_with(match ex.task {
            Task::Grammar => "",
            Task::Addition => "add: ",
            t => t.name(),
        }));
        assert!(!ex.answers.is_empty(), "{ex:?}");
        let mut prev_end = 0;
        for r in &ex.answers {
            assert!(r.start < r.end && r.end <= ex.text.len(), "{ex:?}");
            assert!(r.start >= prev_end, "overlapping answers in {ex:?}");
            assert!(!ex.text[r.clone()].starts_with(' '), "{ex:?}");
            prev_end = r.end;
        }
        // Answers come last.
        assert_eq!(ex.answers.last().unwrap().end, ex.text.len(), "{ex:?}");
    }
}

#[test]
fn answers_are_correct() {
    for ex in generate(&CorpusSpec::new(4, 1000, Task::ALL.to_vec())) {
        let t = &ex.text;
        let ans = answer_strings(&ex).concat();
        match ex.task {
            Task::Copy => {
                let (src, dst) = t["copy: ".len()..].split_once(" | ").unwrap();
                assert_eq!(src, dst);
                assert_eq!(ans, dst);
                assert_eq!(ex.answers.len(), dst.len());
            }
            Task::Count => {
                let rest = &t["count ".len()..];
                let (target, rest) = rest.split_once(" in ").unwrap();
                let (string, n) = rest.split_once(" = ").unwrap();
                assert_eq!(string.matches(target).count().to_string(), n);
                assert_eq!(ans, n);
            }
            Task::Recall => {
                let (pairs, query) = t["recall: ".len()..].split_once("; ").unwrap();
                let (key, value) = query.split_at(1);
                let map: BTreeMap<&str, &str> = pairs.split(", ").map(|p| p.split_at(1)).collect();
                assert_eq!(map.len(), pairs.split(", ").count(), "distinct keys: {t}");
                assert_eq!(map[key], value);
                assert_eq!(value.len(), 1);
                assert_eq!(ans, value);
            }
            Task::Needle => {
                let (hay, query) = t["needle: ".len()..].rsplit_once(" ; ").unwrap();
                let (key, value) = query.split_at(1);
                assert_eq!(value.len(), 2);
                assert!(value.bytes().all(|b| b.is_ascii_digit()));
                let facts: Vec<&str> = hay
                    .split(' ')
                    .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
                    .collect();
                assert!((1..=3).contains(&facts.len()), "{t}");
                assert!(facts.iter().all(|f| f.len() == 3));
                let matching: Vec<&&str> = facts.iter().filter(|f| f.starts_with(key)).collect();
                assert_eq!(matching, [&format!("{key}{value}").as_str()], "{t}");
                assert!(!hay
                    .bytes()
                    .any(|b| b.is_ascii_digit() && !facts.iter().any(|f| f.contains(b as char))));
                assert_eq!(ans, value);
                assert_eq!(ex.answers.len(), 2);
            }
            Task::Repeat => {
                let (symbols, repeat) = t["repeat: ".len()..].split_once(" | ").unwrap();
                assert!((6..=12).contains(&symbols.len()), "{t}");
                let distinct: BTreeSet<char> = symbols.chars().collect();
                assert_eq!(distinct.len(), symbols.len(), "distinct symbols: {t}");
                let from = symbols.find(&repeat[..1]).unwrap();
                assert!(from >= 1 && from + 2 <= symbols.len(), "{t}");
                assert_eq!(&symbols[from..], repeat, "{t}");
                assert_eq!(ans, &repeat[1..]);
                assert_eq!(ex.answers.len(), repeat.len() - 1);
            }
            Task::Addition => {
                let (a, rest) = t["add: ".len()..].split_once('+').unwrap();
                let (b, sum) = rest.split_once('=').unwrap();
                assert_eq!(a.len(), b.len());
                assert_eq!(sum.len(), a.len() + 1);
                let expect: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
                let got: u32 = sum.chars().rev().collect::<String>().parse().unwrap();
                assert_eq!(got, expect, "{t}");
                assert_eq!(ans, sum);
                assert_eq!(ex.answers.len(), sum.len());
            }
            Task::Grammar => {
                let words: Vec<&str> = t.split(' ').collect();
                let verb = words
                    .iter()
                    .position(|w| *w == "is" || *w == "are")
                    .unwrap();
                let noun = words[verb - 1];
                let plural = noun.ends_with('s') || noun == "men" || noun == "children";
                assert_eq!(words[verb], if plural { "are" } else { "is" }, "{t}");
                assert_eq!(answer_strings(&ex), [words[verb], "."]);
                assert!(t.ends_with(" ."));
            }
        }
    }
    assert_eq!(addition::reversed_sum(b"347", b"285"), b"2360");
    assert_eq!(addition::reversed_sum(b"999", b"001"), b"0001");
}

#[test]
fn tasks_are_mixed_evenly() {
    let all = generate(&spec(5, 503));
    assert!(all.iter().all(|e| e.task != Task::Needle));
    for task in Task::SHORT {
        let n = all.iter().filter(|e| e.task == task).count();
        assert!(n == 100 || n == 101, "{task}: {n}");
    }
    let some = generate(&CorpusSpec::new(5, 50, vec![Task::Addition, Task::Grammar]));
    assert_eq!(some.iter().filter(|e| e.task == Task::Addition).count(), 25);
    assert!(some
        .iter()
        .all(|e| matches!(e.task, Task::Addition | Task::Grammar)));
    // Shuffled, not round-robin.
    assert!(all.windows(5).any(|w| w[0].task == w[1].task));
}

#[test]
fn spec_json() {
    let s: CorpusSpec =
        serde_json::from_str(r#"{"seed": 9, "examples": 10, "tasks": ["copy", "addition"]}"#)
            .unwrap();
    assert_eq!(s.tasks, [Task::Copy, Task::Addition]);
    let s: CorpusSpec = serde_json::from_str(r#"{"seed": 9, "examples": 10}"#).unwrap();
    assert!(s.tasks.is_empty());
    assert!(serde_json::from_str::<CorpusSpec>(r#"{"seed": 9, "examples": 1, "x": 1}"#).is_err());
    for t in Task::ALL {
        assert_eq!(t.name().parse::<Task>().unwrap(), t);
        assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
    }
    assert!("Copy".parse::<Task>().is_err());
    let ex = &generate(&spec(1, 1))[0];
    let back: Example = serde_json::from_str(&serde_json::to_string(ex).unwrap()).unwrap();
    assert_eq!(&back, ex);
}

#[test]
fn tokenizer_round_trips_and_keeps_symbols_single() {
    let (examples, tok) = small_tokenizer();
    assert_eq!(special_ids(&tok), (0, 1));
    assert!(tok.get_vocab_size(true) <= 300);
    // Held-out data too.
    for ex in examples.iter().chain(&generate(&spec(8, 300))) {
        let ids = tok
            .encode(ex.text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), ex.text);
        let enc = encode(&tok, ex).unwrap();
        assert_eq!(enc.ids.len(), ids.len() + 2);
        assert_eq!((enc.ids[0], *enc.ids.last().unwrap()), (0, 1));
        assert_eq!(tok.decode(&enc.ids, true).unwrap(), ex.text);
        let texts = token_texts(&tok, ex);
        for piece in &texts {
            if piece
                .bytes()
                .any(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            {
                assert_eq!(
                    piece.len(),
                    1,
                    "symbol merged in {piece:?} of {:?}",
                    ex.text
                );
            }
        }
        // Each answer is covered by whole tokens, and in symbol tasks is exactly one token.
        let flagged: Vec<&str> = texts
            .iter()
            .zip(&enc.answer[1..])
            .filter(|(_, &a)| a)
            .map(|(t, _)| t.as_str())
            .collect();
        if ex.task != Task::Grammar {
            assert_eq!(flagged, answer_strings(ex), "{:?}", ex.text);
        } else {
            assert_eq!(flagged.concat().trim_start(), answer_strings(ex).join(" "));
        }
    }
}

#[test]
fn answer_flags_by_hand() {
    let (_, tok) = small_tokenizer();
    let add = Example {
        task: Task::Addition,
        text: "add: 12+34=640".into(),
        answers: vec![11..12, 12..13, 13..14],
    };
    let enc = encode(&tok, &add).unwrap();
    let texts = token_texts(&tok, &add);
    let flagged: Vec<&str> = texts
        .iter()
        .zip(&enc.answer[1..])
        .filter(|(_, &a)| a)
        .map(|(t, _)| t.as_str())
        .collect();
    assert_eq!(flagged, ["6", "4", "0"]);
    // Ends with "=", 6, 4, 0, eos; nothing before the digits is flagged.
    let n = enc.answer.len();
    assert_eq!(
        &enc.answer[n - 5..],
        [false, true, true, true, false],
        "{texts:?}"
    );
    assert!(!enc.answer[..n - 4].iter().any(|&a| a));

    let grammar = Example {
        task: Task::Grammar,
        text: "the cats are red .".into(),
        answers: vec![9..12, 17..18],
    };
    let enc = encode(&tok, &grammar).unwrap();
    let texts = token_texts(&tok, &grammar);
    // E.g. "the", " ca", "t", "s", " are", " re", "d", " ." with this small vocabulary.
    let expect: Vec<bool> = texts.iter().map(|t| t == " are" || t == " .").collect();
    assert_eq!(enc.answer[1..enc.answer.len() - 1], expect, "{texts:?}");
    assert_eq!(expect.iter().filter(|&&a| a).count(), 2, "{texts:?}");
}

#[test]
fn tokenizer_training_is_deterministic() {
    let examples = generate(&spec(11, 300));
    let a = train_tokenizer(&examples, 320).unwrap();
    let b = train_tokenizer(&examples, 320).unwrap();
    assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
    assert!(train_tokenizer(&examples, 257).is_err());
}

#[test]
fn pack_rows() {
    let (examples, tok) = small_tokenizer();
    // Short examples only (needle haystacks are longer than these rows).
    let examples: Vec<Example> = examples
        .into_iter()
        .filter(|e| e.task != Task::Needle)
        .collect();
    let examples = &examples[..];
    let seq_len = 96;
    let encoded: Vec<Encoded> = examples.iter().map(|e| encode(&tok, e).unwrap()).collect();
    const PAD: u32 = u32::MAX;
    let rows = pack_encoded(&encoded, seq_len, PAD).unwrap();
    assert!(rows.len() > 5);
    // Every row is full width and starts at an example; cutting the rows at bos and
    // dropping the padding gives back every example exactly once, none of them cut.
    let mut pieces = Vec::new();
    for row in &rows {
        assert_eq!(row.ids.len(), seq_len + 1);
        assert_eq!(row.answer.len(), seq_len + 1);
        assert_eq!(row.ids[0], 0, "rows start with bos");
        let content: Vec<(u32, bool)> = row
            .ids
            .iter()
            .zip(&row.answer)
            .map(|(&i, &a)| (i, a))
            .take_while(|&(i, _)| i != PAD)
            .collect();
        assert!(row.ids[content.len()..].iter().all(|&i| i == PAD));
        assert!(!row.answer[content.len()..].iter().any(|&a| a));
        for piece in content.split_inclusive(|&(i, _)| i == 1) {
            pieces.push(piece.to_vec());
        }
    }
    let mut expected: Vec<Vec<(u32, bool)>> = encoded
        .iter()
        .filter(|e| e.ids.len() <= seq_len + 1)
        .map(|e| {
            e.ids
                .iter()
                .copied()
                .zip(e.answer.iter().copied())
                .collect()
        })
        .collect();
    assert_eq!(expected.len(), encoded.len(), "all examples fit a row here");
    expected.sort();
    pieces.sort();
    assert_eq!(pieces, expected);
    // Gaps are filled from later examples: little padding.
    let padding: usize = rows
        .iter()
        .map(|r| r.ids.iter().filter(|&&i| i == PAD).count())
        .sum();
    assert!(
        padding * 20 < rows.len() * (seq_len + 1),
        "{padding} padding tokens in {} rows",
        rows.len()
    );
    // pack is pack_encoded's ids with eos padding.
    let plain = pack(&tok, examples, seq_len).unwrap();
    let with_eos = pack_encoded(&encoded, seq_len, 1).unwrap();
    assert_eq!(
        plain,
        with_eos.into_iter().map(|r| r.ids).collect::<Vec<_>>()
    );
    assert!(pack(&tok, examples, 0).is_err());
    // One short example: one padded row.
    let one = pack(&tok, &examples[..1], 1000).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0][..encoded[0].ids.len()], encoded[0].ids[..]);
}

#[test]
fn pack_cuts_examples_longer_than_a_row() {
    let long = Encoded {
        ids: (0..25).collect(),
        answer: (0..25).map(|i| i % 3 == 0).collect(),
    };
    let short = Encoded {
        ids: vec![0, 7, 1],
        answer: vec![false, true, false],
    };
    let rows = pack_encoded(&[long.clone(), short.clone()], 9, 99).unwrap();
    // Two full rows of the long example, then its 5-token tail with the short one after it.
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].ids, (0..10).collect::<Vec<u32>>());
    assert_eq!(rows[1].ids, (10..20).collect::<Vec<u32>>());
    assert_eq!(rows[2].ids, vec![20, 21, 22, 23, 24, 0, 7, 1, 99, 99]);
    assert_eq!(rows[1].answer, long.answer[10..20]);
    assert!(rows[2].answer[6]);
    assert!(!rows[2].answer[8]);
}

#[test]
fn pack_fills_a_gap_from_later_examples() {
    let ex = |n: u32| Encoded {
        ids: (0..n).collect(),
        answer: vec![false; n as usize],
    };
    // Row width 8: [6] leaves 2; [5] does not fit, so [2] (later) fills the gap first.
    let rows = pack_encoded(&[ex(6), ex(5), ex(2), ex(3)], 7, 99).unwrap();
    let ids: Vec<Vec<u32>> = rows.into_iter().map(|r| r.ids).collect();
    assert_eq!(
        ids,
        vec![vec![0, 1, 2, 3, 4, 5, 0, 1], vec![0, 1, 2, 3, 4, 0, 1, 2],]
    );
}

/// Every led row starts with its lead (in order), holds each fill example at most once,
/// takes fill examples first fit in order, and pads the rest; a lead longer than a row is
/// cut into full rows, its tail leading the next.
#[test]
fn pack_led_starts_every_row_with_a_lead_and_fills_the_room() {
    let ex = |base: u32, n: u32| Encoded {
        ids: (base..base + n).collect(),
        answer: (0..n).map(|i| i == n - 1).collect(),
    };
    // Width 8. Leads of 5, 7 and 11 tokens; fill of 2, 4, 1 and 3 tokens.
    let leads = [ex(10, 5), ex(20, 7), ex(30, 11)];
    let fill = [ex(50, 2), ex(60, 4), ex(70, 1), ex(80, 3)];
    let (rows, used) = pack_led(&leads, &fill, 7, 99).unwrap();
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
    assert_eq!(
        ids,
        vec![
            // Room 3: [2] fits, [4] does not, [1] fits.
            vec![10, 11, 12, 13, 14, 50, 51, 70],
            // Room 1: only [4] and [3] are left; neither fits.
            vec![20, 21, 22, 23, 24, 25, 26, 99],
            // 11 tokens: a full row, then the 3-token tail with [4] (room 5); [3] is left over.
            vec![30, 31, 32, 33, 34, 35, 36, 37],
            vec![38, 39, 40, 60, 61, 62, 63, 99],
        ]
    );
    assert_eq!(used, 3);
    // Answer flags travel with their tokens; padding is never an answer.
    assert!(rows[0].answer[4] && rows[0].answer[6] && rows[0].answer[7]);
    assert!(!rows[1].answer[7]);
    assert!(rows[3].answer[6] && !rows[3].answer[7]);
    assert!(pack_led(&leads, &fill, 0, 99).is_err());
}

#[test]
fn save_and_load_tokenizer() {
    let (examples, tok) = small_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    save_tokenizer(&tok, &path).unwrap();
    save_tokenizer(&tok, &path).unwrap(); // overwrites
    let loaded = Tokenizer::from_file(&path).unwrap();
    assert_eq!(special_ids(&loaded), (0, 1));
    for ex in &examples[..50] {
        assert_eq!(encode(&loaded, ex).unwrap(), encode(&tok, ex).unwrap());
    }
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 1);
}

#[test]
fn prompts_encoded_with_special_tokens_start_like_training_examples() {
    let (examples, tok) = small_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    save_tokenizer(&tok, &path).unwrap();
    let loaded = Tokenizer::from_file(&path).unwrap();
    for ex in &examples[..20] {
        let trained = encode(&loaded, ex).unwrap().ids;
        // A prompt typed by a user: the example's text, special tokens on.
        let prompt = loaded.encode(ex.text.as_str(), true).unwrap();
        assert_eq!(prompt.get_ids()[0], 0, "<s> first");
        // The same ids as the training example, without its closing </s>.
        assert_eq!(prompt.get_ids(), &trained[..trained.len() - 1]);
        // Without special tokens, nothing is added.
        let plain = loaded.encode(ex.text.as_str(), false).unwrap();
        assert_eq!(plain.get_ids(), &trained[1..trained.len() - 1]);
    }
}

proptest::proptest! {
    /// Packing loses, repeats and reorders nothing within an example: every token (all
    /// distinct here) lands exactly once; an example that fits a row sits whole and in
    /// order in one row; a longer one fills whole rows in order before its tail.
    #[test]
    fn packing_keeps_every_example_whole(
        lengths in proptest::collection::vec(1usize..40, 1..30),
        seq_len in 1usize..30,
    ) {
        const PAD: u32 = 0;
        let encoded: Vec<Encoded> = lengths
            .iter()
            .enumerate()
            .map(|(k, &n)| Encoded {
                ids: (0..n as u32).map(|j| k as u32 * 1000 + j + 1).collect(),
                answer: (0..n).map(|j| j % 2 == 1).collect(),
            })
            .collect();
        let rows = pack_encoded(&encoded, seq_len, PAD).unwrap();
        let width = seq_len + 1;
        let mut seen = std::collections::HashMap::new();
        for (r, row) in rows.iter().enumerate() {
            proptest::prop_assert_eq!(row.ids.len(), width);
            proptest::prop_assert_eq!(row.answer.len(), width);
            for (i, (&id, &a)) in row.ids.iter().zip(&row.answer).enumerate() {
                if id == PAD {
                    proptest::prop_assert!(!a);
                } else {
                    proptest::prop_assert!(seen.insert(id, (r, i)).is_none(), "token {} twice", id);
                    proptest::prop_assert_eq!(a, (id - 1) % 1000 % 2 == 1);
                }
            }
        }
        let total: usize = lengths.iter().sum();
        proptest::prop_assert_eq!(seen.len(), total);
        for (k, e) in encoded.iter().enumerate() {
            let at: Vec<(usize, usize)> = e.ids.iter().map(|id| seen[id]).collect();
            let cut = if e.ids.len() > width { e.ids.len() / width * width } else { 0 };
            // Whole rows of an over-long example, then its tail (or the whole example) in
            // one row, consecutive positions.
            for (j, w) in at.windows(2).enumerate().skip(cut) {
                proptest::prop_assert!(w[1] == (w[0].0, w[0].1 + 1), "example {} split at {}", k, j);
            }
            for (j, &(_, column)) in at.iter().enumerate().take(cut) {
                proptest::prop_assert_eq!(column, j % width);
            }
        }
    }
}

/// The sentences of a needle haystack before its fact and in all (a grammar sentence ends
/// with ` .`, and so does the fact `K47 .`).
fn fact_place(text: &str) -> (usize, usize) {
    let (hay, _) = text["needle: ".len()..].rsplit_once(" ; ").unwrap();
    let parts: Vec<&str> = hay.split(" . ").collect();
    let fact = parts
        .iter()
        .position(|p| p.starts_with(|c: char| c.is_ascii_uppercase()))
        .unwrap();
    // Every part but the fact is a sentence (the last one keeps its trailing ` .`).
    (fact, parts.len() - 1)
}

/// A stage's generated needles hold one fact, at a depth inside the spec's interval, in a
/// haystack whose length is inside the spec's range; they cover the range (not one length,
/// not one depth); the same spec gives the same examples and another seed others.
#[test]
fn needle_leads_have_the_lengths_and_depths_asked_for() {
    let spec = NeedleLeads {
        seed: 4,
        examples: 200,
        sentences: (20, 30),
        facts: vec![(0.0, 0.25)],
        ask_all: false,
    };
    assert_eq!(spec.problem(), None);
    let examples = spec.generate();
    assert_eq!(examples.len(), 200);
    let mut lengths = BTreeSet::new();
    let mut places = BTreeSet::new();
    for ex in &examples {
        assert_eq!(ex.task, Task::Needle);
        let t = &ex.text;
        let (hay, query) = t["needle: ".len()..].rsplit_once(" ; ").unwrap();
        let facts: Vec<&str> = hay
            .split(' ')
            .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
            .collect();
        assert_eq!(facts, [query], "one fact, the one asked for: {t}");
        assert_eq!(ex.answers.len(), 2);
        assert_eq!(&t[ex.answers[0].start..ex.answers[1].end], &query[1..]);
        let (before, sentences) = fact_place(t);
        assert!((20..=30).contains(&sentences), "{sentences} sentences: {t}");
        // round(depth * sentences) with depth <= 0.25.
        assert!(
            before as f64 <= (0.25 * sentences as f64).round(),
            "{before}/{sentences}"
        );
        lengths.insert(sentences);
        places.insert(before);
    }
    assert!(lengths.len() >= 8, "{lengths:?}");
    assert!(places.contains(&0) && places.len() >= 5, "{places:?}");
    assert_eq!(spec.generate(), examples);
    assert_ne!(
        NeedleLeads {
            seed: 5,
            ..spec.clone()
        }
        .generate(),
        examples
    );
    // A depth interval away from 0 keeps the fact between its bounds.
    let deep = NeedleLeads {
        facts: vec![(0.5, 0.75)],
        ..spec.clone()
    };
    for ex in deep.generate() {
        let (before, sentences) = fact_place(&ex.text);
        let n = sentences as f64;
        assert!(
            (0.5 * n).round() as usize <= before && before as f64 <= (0.75 * n).round(),
            "{before}/{sentences}"
        );
    }
    // The evaluation's format: at_depth's haystack of the same shape parses the same way.
    let eval = needle::at_depth(1000, 25, 0.2);
    assert_eq!(fact_place(&eval.text), (5, 25));
}

/// With several depth intervals, every example has one fact in each (in order, distinct
/// keys) and asks for one of them; over many examples each is asked for.
#[test]
fn needle_leads_place_one_fact_per_interval_and_ask_for_any() {
    let spec = NeedleLeads {
        seed: 8,
        examples: 150,
        sentences: (20, 30),
        facts: vec![(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)],
        ask_all: false,
    };
    let mut asked = [0; 3];
    for ex in spec.generate() {
        let t = &ex.text;
        let (hay, query) = t["needle: ".len()..].rsplit_once(" ; ").unwrap();
        let parts: Vec<&str> = hay.split(" . ").collect();
        let sentences = parts.len() - 3;
        let facts: Vec<(usize, &str)> = parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.starts_with(|c: char| c.is_ascii_uppercase()))
            // Sentences before the fact: its index less the facts before it.
            .enumerate()
            .map(|(k, (i, p))| (i - k, p.trim_end_matches(" .")))
            .collect();
        assert_eq!(facts.len(), 3, "{t}");
        let keys: BTreeSet<char> = facts.iter().map(|f| f.1.chars().next().unwrap()).collect();
        assert_eq!(keys.len(), 3, "distinct keys: {t}");
        for (&(before, _), &(from, to)) in facts.iter().zip(&spec.facts) {
            let n = sentences as f64;
            assert!(
                (from * n).round() as usize <= before && before as f64 <= (to * n).round(),
                "{before}/{sentences} outside ({from}, {to}): {t}"
            );
        }
        let which = facts.iter().position(|f| f.1 == query).unwrap();
        asked[which] += 1;
        assert_eq!(&t[ex.answers[0].start..ex.answers[1].end], &query[1..]);
    }
    assert!(asked.iter().all(|&a| a >= 30), "{asked:?}");
}

/// With `ask_all`, every fact is asked for exactly once after the haystack, each question
/// followed by its own value as the two answers, in an order that varies (not always the
/// facts' order); the haystack is the one the single-question spec would place facts in.
#[test]
fn needle_leads_ask_all_asks_every_fact_once_with_its_value() {
    let spec = NeedleLeads {
        seed: 8,
        examples: 100,
        sentences: (20, 30),
        facts: vec![(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)],
        ask_all: true,
    };
    assert_eq!(spec.problem(), None);
    let mut reordered = 0;
    for ex in spec.generate() {
        let t = &ex.text;
        let (hay, questions) = t["needle: ".len()..].split_once(" ; ").unwrap();
        let facts: Vec<&str> = hay
            .split(' ')
            .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
            .collect();
        assert_eq!(facts.len(), 3, "{t}");
        let asked: Vec<&str> = questions.split(" ; ").collect();
        assert_eq!(asked.len(), 3, "{t}");
        let mut sorted = asked.clone();
        sorted.sort_unstable();
        let mut placed = facts.clone();
        placed.sort_unstable();
        assert_eq!(sorted, placed, "each fact asked once with its value: {t}");
        reordered += usize::from(asked != facts);
        // Two answers a question, the value digits after its key, in the text's order.
        assert_eq!(ex.answers.len(), 6, "{t}");
        let start = t.len() - questions.len();
        for (k, q) in asked.iter().enumerate() {
            let key_at =
                start + k * " ; ".len() + asked[..k].iter().map(|a| a.len()).sum::<usize>();
            assert_eq!(&t[key_at..key_at + 3], *q);
            assert_eq!(ex.answers[2 * k], key_at + 1..key_at + 2, "{t}");
            assert_eq!(ex.answers[2 * k + 1], key_at + 2..key_at + 3, "{t}");
        }
    }
    assert!(
        reordered >= 50,
        "the question order follows the facts' order: {reordered}"
    );
}

/// Every field of a spec that cannot generate is named.
#[test]
fn needle_leads_name_what_cannot_generate() {
    let ok = NeedleLeads {
        seed: 0,
        examples: 3,
        sentences: (5, 9),
        facts: vec![(0.1, 0.3)],
        ask_all: false,
    };
    let problem = |n: NeedleLeads| n.problem().unwrap_or_default();
    assert!(problem(NeedleLeads {
        examples: 0,
        ..ok.clone()
    })
    .contains("examples"));
    assert!(problem(NeedleLeads {
        sentences: (9, 5),
        ..ok.clone()
    })
    .contains("sentences"));
    assert!(problem(NeedleLeads {
        sentences: (0, 5),
        ..ok.clone()
    })
    .contains("sentences"));
    assert!(problem(NeedleLeads {
        facts: vec![],
        ..ok.clone()
    })
    .contains("facts"));
    assert!(problem(NeedleLeads {
        facts: vec![(0.0, 1.0); 27],
        ..ok.clone()
    })
    .contains("facts"));
    let bad = |facts: Vec<(f64, f64)>| {
        problem(NeedleLeads {
            facts,
            ..ok.clone()
        })
    };
    assert!(bad(vec![(0.0, 0.1), (0.3, 0.1)]).contains("facts[1]"));
    assert!(bad(vec![(0.0, 1.5)]).contains("facts[0]"));
    assert!(bad(vec![(f64::NAN, 0.5)]).contains("facts[0]"));
    assert_eq!(ok.problem(), None);
}
