//! The device path's composition, run through the host primitives, against the CPU
//! kernel on random problems: many small groups, one large group, void pixels, absent
//! classes, ties, both layouts, both widths, several chunks per call.

use super::host::HostPrimitives;
use super::*;
use crate::input::VOID;
use crate::kernel::call::{ChannelOrder, ClassEntry, ErrorKind, Output, Selection};
use crate::kernel::cpu::{solve, HostSort};
use crate::test_rng::Lcg;

/// A random problem: values in `[0, 1)` (or on `levels` steps, for ties), labels in
/// `[0, classes)` with a `void` share of void pixels.
struct Case {
    dims: (usize, usize, usize),
    levels: Option<u32>,
    void: f32,
    labels_from: usize,
    /// Values are mapped from `[0, 1)` to `[lo, lo + width)`.
    spread: (f32, f32),
    seed: u64,
}

impl Case {
    /// Probabilities in `[0, 1)` of `dims` with labels from `labels_from` classes and a
    /// `void` share of void pixels.
    fn probabilities(
        dims: (usize, usize, usize),
        labels_from: usize,
        void: f32,
        seed: u64,
    ) -> Self {
        Self {
            dims,
            levels: None,
            void,
            labels_from,
            spread: (0.0, 1.0),
            seed,
        }
    }
}

/// [`check`] in both widths for every setup.
fn check_all(case: &Case, setups: &[Setup]) {
    for setup in setups {
        check::<f32>(case, setup);
        check::<f64>(case, setup);
    }
}

fn make<T: HostSort>(c: &Case) -> (Vec<T>, Vec<u32>) {
    let (b, ch, s) = c.dims;
    let mut rng = Lcg(c.seed);
    let x = (0..b * ch * s)
        .map(|_| {
            let u = rng.next_f32();
            let u = match c.levels {
                Some(n) => (u * n as f32).floor() / n as f32,
                None => u,
            };
            T::from_f64(f64::from(c.spread.0 + u * c.spread.1))
        })
        .collect();
    let labels = (0..b * s)
        .map(|_| {
            if rng.next_f32() < c.void {
                VOID
            } else {
                (rng.next_u64() >> 40) as u32 % c.labels_from as u32
            }
        })
        .collect();
    (x, labels)
}

struct Setup {
    order: ChannelOrder,
    kind: ErrorKind,
    output: Output,
    per_image: bool,
    sel: Selection,
    /// Overrides the chunk budget (bytes), to force several chunks.
    budget: Option<usize>,
}

fn all_classes(n: usize, only_present: bool) -> Selection {
    Selection {
        entries: (0..n)
            .map(|c| ClassEntry {
                class: c as u32,
                channel: c,
                weight: 1.0 + c as f64 * 0.25,
            })
            .collect(),
        only_present,
    }
}

/// Runs both paths and checks values bit for bit (zeros of either sign equal) and the
/// per-group sums to 1e-12 relative.
fn check<T: HostSort>(case: &Case, setup: &Setup) {
    let (x, labels) = make::<T>(case);
    let b = case.dims.0;
    let group_scale = 1.0 / b as f64;
    let call = Call {
        dims: case.dims,
        order: setup.order,
        kind: setup.kind,
        output: setup.output,
        per_image: setup.per_image,
        group_scale,
        from_logits: false,
    };
    let plan = Plan::new(call, &setup.sel, &labels).unwrap();
    let cpu = solve(&plan, &x, &labels).unwrap();
    let mut segs = Segments::new(plan, std::mem::size_of::<T>() == 8).unwrap();
    if let Some(budget) = setup.budget {
        let per = element::bytes_per_element(segs.wide);
        segs.chunks = chunks(segs.jobs.len(), segs.seg_len, per, budget).unwrap();
    }
    let mut host = HostPrimitives::new(&segs, &x, &labels).unwrap();
    run(&mut host, &segs).unwrap();
    let tag = format!(
        "{:?} {:?} {:?} {:?}",
        case.dims, setup.order, setup.kind, setup.output
    );
    assert_eq!(host.out.len(), cpu.values.len());
    for (i, (a, e)) in host.out.iter().zip(&cpu.values).enumerate() {
        let (a, e) = (a.to_f64(), e.to_f64());
        assert!(a == e, "{tag}: value {i}: {a} vs {e}");
    }
    let close = |a: f64, e: f64| (a - e).abs() <= 1e-12 * e.abs().max(1e-300) || a == e;
    if setup.output == Output::Linear {
        for g in 0..segs.groups() {
            assert!(
                close(host.group_losses[g], cpu.losses[g]),
                "{tag}: loss {g}: {} vs {}",
                host.group_losses[g],
                cpu.losses[g]
            );
            assert!(close(host.offsets[g], cpu.offsets[g]), "{tag}: offset {g}");
        }
    }
}

/// Class 1 of a one-channel input: the binary losses.
fn binary_class() -> Selection {
    Selection {
        entries: vec![ClassEntry {
            class: 1,
            channel: 0,
            weight: 1.0,
        }],
        only_present: false,
    }
}

fn setups(classes: usize) -> Vec<Setup> {
    let mut out = Vec::new();
    for order in [ChannelOrder::First, ChannelOrder::Last] {
        for per_image in [true, false] {
            for (only_present, budget) in [(false, None), (true, Some(4000))] {
                for output in [Output::Linear, Output::Weights] {
                    out.push(Setup {
                        order,
                        kind: ErrorKind::Abs,
                        output,
                        per_image,
                        sel: all_classes(classes, only_present),
                        budget,
                    });
                }
            }
        }
    }
    out
}

#[test]
fn many_small_groups_with_void_and_absent_classes() {
    // Labels from the first 3 of 5 classes: classes 3 and 4 are absent everywhere.
    check_all(&Case::probabilities((9, 5, 37), 3, 0.1, 1), &setups(5));
}

#[test]
fn ties_keep_the_cpu_order() {
    let case = Case {
        levels: Some(4),
        ..Case::probabilities((4, 3, 200), 3, 0.05, 2)
    };
    check_all(&case, &setups(3));
}

#[test]
fn the_hinge_and_a_class_list() {
    // Logits in [-2, 2): hinge errors on both sides of 0.
    let case = Case {
        levels: Some(16),
        spread: (-2.0, 4.0),
        ..Case::probabilities((6, 1, 300), 2, 0.1, 3)
    };
    for output in [Output::Linear, Output::Weights] {
        for per_image in [true, false] {
            let setup = Setup {
                order: ChannelOrder::First,
                kind: ErrorKind::Hinge,
                output,
                per_image,
                sel: binary_class(),
                budget: Some(1),
            };
            check::<f32>(&case, &setup);
            check::<f64>(&case, &setup);
        }
    }
    // A list naming a class twice and skipping one.
    let case = Case::probabilities((3, 4, 50), 4, 0.0, 4);
    let entry = |class: u32| ClassEntry {
        class,
        channel: class as usize,
        weight: 1.0,
    };
    let setup = Setup {
        order: ChannelOrder::Last,
        kind: ErrorKind::Abs,
        output: Output::Linear,
        per_image: false,
        sel: Selection {
            entries: vec![entry(2), entry(0), entry(2)],
            only_present: false,
        },
        budget: None,
    };
    check::<f32>(&case, &setup);
}

#[test]
fn all_void_and_empty_groups() {
    let case = Case::probabilities((3, 2, 10), 2, 1.0, 5);
    for setup in setups(2) {
        check::<f32>(&case, &setup);
    }
}

#[test]
fn one_group_of_ten_million_pixels() {
    // A binary hinge over a batch of 10 images of 1000 x 1000 pixels: one job, one chunk.
    let case = Case::probabilities((10, 1, 1_000_000), 2, 0.02, 6);
    let setup = Setup {
        order: ChannelOrder::First,
        kind: ErrorKind::Abs,
        output: Output::Linear,
        per_image: false,
        sel: binary_class(),
        budget: None,
    };
    check::<f32>(&case, &setup);
}
