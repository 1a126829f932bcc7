//! [`Task::Repeat`]: `repeat: K7F2QX9B | F2QX9B`.
//!
//! 6 to 12 *distinct* symbols, `|`, then the same symbols again from a random index (not the
//! first). The first repeated symbol is unpredictable; every later one is the symbol that
//! followed the current symbol's earlier occurrence. Since the restart point is random and
//! the symbols distinct, neither a fixed offset nor a position count finds it: only a
//! content match (previous-token head + match, an induction head) does. This is the lookup
//! [`Task::Recall`] and [`Task::Needle`] need; [`Task::Copy`] (repeats allowed, always from
//! the first symbol) can also be solved by position.

use super::{Builder, Example, Rng, Task};

const SYMBOLS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

pub(super) fn sample(rng: &mut Rng) -> Example {
    let len = rng.between(6, 12);
    let mut pool = SYMBOLS.to_vec();
    rng.shuffle(&mut pool);
    let symbols = &pool[..len];
    let from = rng.between(1, len - 2);
    Builder::new(Task::Repeat)
        .push("repeat: ")
        .symbols(symbols)
        .push(" | ")
        .symbols(&symbols[from..from + 1])
        .answer_symbols(&symbols[from + 1..])
        .build()
}
