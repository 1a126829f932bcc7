//! [`Task::Grammar`]: `the big cats are very red .`.

use super::{Builder, Example, Rng, Task};

/// (singular, plural)
const NOUNS: &[(&str, &str)] = &[
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("fox", "foxes"),
    ("tree", "trees"),
    ("car", "cars"),
    ("man", "men"),
    ("child", "children"),
];
const SINGULAR_DETS: &[&str] = &["a", "this", "one"];
const PLURAL_DETS: &[&str] = &["these", "some", "two"];
const ANY_DETS: &[&str] = &["the", "my"];
const ADJECTIVES: &[&str] = &[
    "big", "small", "red", "green", "happy", "sad", "tall", "cold",
];
const ADVERBS: &[&str] = &["very", "not", "too"];

pub(super) fn sample(rng: &mut Rng) -> Example {
    let plural = rng.coin();
    let det = match (rng.below(3), plural) {
        (0, _) => rng.pick(ANY_DETS),
        (_, false) => rng.pick(SINGULAR_DETS),
        (_, true) => rng.pick(PLURAL_DETS),
    };
    let (singular, plural_form) = rng.pick(NOUNS);
    let mut b = Builder::new(Task::Grammar);
    b.push(det);
    if rng.coin() {
        b.push(" ").push(rng.pick(ADJECTIVES));
    }
    b.push(" ")
        .push(if plural { plural_form } else { singular })
        .push(" ")
        .answer(if plural { "are" } else { "is" });
    if rng.below(3) == 0 {
        b.push(" ").push(rng.pick(ADVERBS));
    }
    b.push(" ")
        .push(rng.pick(ADJECTIVES))
        .push(" ")
        .answer(".")
        .build()
}
