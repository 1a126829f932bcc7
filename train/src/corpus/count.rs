//! [`Task::Count`]: `count A in ABAACA = 4`.

use super::{Builder, Example, Rng, Task};

pub(super) fn sample(rng: &mut Rng) -> Example {
    let k = rng.between(2, 4);
    let alphabet = rng.distinct_letters(k);
    let len = rng.between(3, 9);
    let target = rng.pick(&alphabet);
    let string: Vec<u8> = (0..len).map(|_| rng.pick(&alphabet)).collect();
    let count = string.iter().filter(|&&c| c == target).count();
    Builder::new(Task::Count)
        .push("count ")
        .symbols(&[target])
        .push(" in ")
        .symbols(&string)
        .push(" = ")
        .answer(&count.to_string())
        .build()
}
