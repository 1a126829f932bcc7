//! [`Task::Recall`]: `recall: A3, Q8, Z1; Q8`.
//!
//! Each value is written right after its key, and the query repeats the key, so the answer
//! is the token that followed the query key's earlier occurrence: exactly what an induction
//! head (previous-token head + match, the circuit [`Task::Copy`] trains) fetches. The first
//! format (`recall: A=3, Q=8, Z=1; Q?8`) put a separator between key and value and a `?`
//! between query and answer, so one lookup was not enough (the value had to learn its key
//! from two tokens back, and `?` its query from one back, before the lookup): the first
//! demo model, trained on it, stayed at chance (10%), though it copied (an induction head)
//! at 98%.

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
        b.symbols(&[k, v]);
    }
    b.push("; ")
        .symbols(&[keys[query]])
        .answer_symbols(&[values[query]])
        .build()
}
