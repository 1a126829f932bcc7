//! [`Task::Copy`]: `copy: K7F2Q | K7F2Q`.

use super::{Builder, Example, Rng, Task};

const SYMBOLS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

pub(super) fn sample(rng: &mut Rng) -> Example {
    let len = rng.between(2, 8);
    let symbols: Vec<u8> = (0..len).map(|_| rng.pick(SYMBOLS)).collect();
    Builder::new(Task::Copy)
        .push("copy: ")
        .symbols(&symbols)
        .push(" | ")
        .answer_symbols(&symbols)
        .build()
}
