//! [`Task::Recall`]: `recall: A=3, Q=8, Z=1; Q?8`.

use super::{Builder, Example, Rng, Task};

pub(super) fn sample(rng: &mut Rng) -> Example {
    let k = rng.between(2, 6);
    let keys = rng.distinct_letters(k);
    let values: Vec<u8> = keys.iter().map(|_| rng.digit()).collect();
    let query = rng.below(keys.len());
    let mut b = Builder::new(Task::Recall);
    b.push("recall: ");
    for (i, (&k, &v)) in keys.iter().zip(&values).enumerate() {
        if i > 0 {
            b.push(", ");
        }
        b.symbols(&[k]).push("=").symbols(&[v]);
    }
    b.push("; ")
        .symbols(&[keys[query]])
        .push("?")
        .answer_symbols(&[values[query]])
        .build()
}
