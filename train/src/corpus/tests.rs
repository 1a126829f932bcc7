use super::*;
use std::collections::BTreeMap;
use tokenizers::Tokenizer;

fn spec(seed: u64, examples: usize) -> CorpusSpec {
    CorpusSpec {
        seed,
        examples,
        tasks: Vec::new(),
    }
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
    for ex in generate(&spec(3, 2000)) {
        assert!(ex.text.is_ascii());
        assert!(
            (10..=60).contains(&ex.text.len()),
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
    for ex in generate(&spec(4, 1000)) {
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
                let (key, value) = query.split_once('?').unwrap();
                let map: BTreeMap<&str, &str> = pairs
                    .split(", ")
                    .map(|p| p.split_once('=').unwrap())
                    .collect();
                assert_eq!(map[key], value);
                assert_eq!(ans, value);
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
    for task in Task::ALL {
        let n = all.iter().filter(|e| e.task == task).count();
        assert!(n == 100 || n == 101, "{task}: {n}");
    }
    let some = generate(&CorpusSpec {
        seed: 5,
        examples: 50,
        tasks: vec![Task::Addition, Task::Grammar],
    });
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
    let examples = &examples[..50];
    let seq_len = 32;
    let rows = pack(&tok, examples, seq_len).unwrap();
    let stream: Vec<u32> = examples
        .iter()
        .flat_map(|e| encode(&tok, e).unwrap().ids)
        .collect();
    assert_eq!(rows.len(), (stream.len() - 1) / seq_len);
    assert!(rows.len() > 5);
    for (r, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), seq_len + 1);
        assert_eq!(row[..], stream[r * seq_len..(r + 1) * seq_len + 1]);
    }
    let encoded: Vec<Encoded> = examples.iter().map(|e| encode(&tok, e).unwrap()).collect();
    let masked = pack_encoded(&encoded, seq_len).unwrap();
    assert_eq!(masked.len(), rows.len());
    assert!(masked.iter().all(|m| m.answer.len() == seq_len + 1));
    assert!(masked.iter().any(|m| m.answer.iter().any(|&a| a)));
    assert!(pack(&tok, examples, 0).is_err());
    assert!(pack(&tok, &examples[..1], 1000).unwrap().is_empty());
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
