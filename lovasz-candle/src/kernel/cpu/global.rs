//! The per-batch loss over the union of every rank's pixels (a process group's global
//! batch): the plan from label counts summed over the ranks, and each rank's outputs from
//! the global rank of each of its errors.
//!
//! The global batch is the ranks' batches concatenated in rank order, so two equal errors
//! of different ranks sort by rank (their pixel indices in the concatenation). A pixel's
//! Jaccard weight needs only how many foreground and background pixels of the union sort
//! before it ([`JaccardWalk::resume`]): each rank sorts its own keys per job, and the ranks
//! exchange, per job, the error keys of their kept pixels (the keys' high word: 4 bytes a
//! pixel in f32, 8 in f64) split into a foreground and a background list, each ascending;
//! background pixels whose error is below every foreground error of the union weigh
//! exactly 0 and are left out, after a first exchange of each job's foreground floor.
//! A rank then counts, for each of its keys in sorted order, the other ranks' keys before
//! it by a merge. The weights are bit for bit those of one process over the whole batch;
//! the loss, summed per rank and then over the ranks, is the same on every rank.

use candle::{bail, DType, Result};

use super::buffer::zeroed;
use super::build_keys::build_keys;
use super::sort::HostSort;
use super::Slices;
use crate::kernel::call::{Call, Output, Selection, Solved};
use crate::kernel::jaccard_walk::JaccardWalk;
use crate::kernel::keys::index_shift;
use crate::kernel::plan::{LabelCounts, Plan};
use crate::kernel::real::Real;
use crate::process_group::{ProcessGroup, ReduceBuffer};

/// What every rank's call must agree on, as numbers: dims, kind, output, layout, logits,
/// float width, and the classes with their weights.
fn header<T: Real>(call: &Call, sel: &Selection, label_dtype: DType) -> Vec<u64> {
    let (b, c, s) = call.dims;
    let mut h = vec![
        b as u64,
        c as u64,
        s as u64,
        LABEL_DTYPES
            .iter()
            .position(|&d| d == label_dtype)
            .unwrap_or(LABEL_DTYPES.len()) as u64,
        call.kind as u64,
        call.output as u64,
        call.order as u64,
        u64::from(call.from_logits),
        u64::from(call.per_image),
        std::mem::size_of::<T>() as u64,
        u64::from(sel.only_present),
        sel.entries.len() as u64,
    ];
    for e in &sel.entries {
        h.extend([u64::from(e.class), e.channel as u64, e.weight.to_bits()]);
    }
    h
}

/// The label dtypes, by their code in a header (any other: the list's length).
const LABEL_DTYPES: [DType; 5] = [DType::U8, DType::U32, DType::I16, DType::I32, DType::I64];

/// The name of a label dtype's code.
fn label_dtype_name(code: u64) -> String {
    match LABEL_DTYPES.get(code as usize) {
        Some(d) => format!("{d:?}").to_lowercase(),
        None => "not an integer".into(),
    }
}

fn to_bytes(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<u64> {
    (bytes.chunks_exact(8))
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

/// The plan of a per-batch `call` over the union of every rank's batch: the label counts
/// of `labels` (this rank's, `[B, S]`, read from `label_dtype`) summed over the ranks of
/// `group`. Fails on every rank when the ranks' calls differ (dims, loss, classes,
/// dtypes).
pub(crate) fn plan_global<T: Real>(
    call: Call,
    sel: &Selection,
    labels: &[u32],
    label_dtype: DType,
    group: &dyn ProcessGroup,
) -> Result<Plan> {
    if call.per_image {
        bail!("lovasz distributed: a per-image loss needs no process group (internal error)")
    }
    let counts = Plan::count(&call, sel, labels)?;
    let head = header::<T>(&call, sel, label_dtype);
    let mut mine = vec![head.len() as u64];
    mine.extend(&head);
    mine.extend(&counts.valid);
    for c in &counts.classes {
        mine.push(c.len() as u64);
        mine.extend(c);
    }
    let parts = group.all_gather(&to_bytes(&mine))?;
    let me = group.rank();
    let mut sums = counts.clone();
    for (q, part) in parts.iter().enumerate() {
        let theirs = from_bytes(part);
        let n = theirs.first().copied().unwrap_or(0) as usize;
        if theirs.len() < 1 + n || theirs[1..1 + n] != head[..] {
            let (a, b) = (theirs.get(4).copied(), head[3]);
            if theirs.get(1..4) == Some(&head[..3]) && a != Some(b) {
                bail!(
                    "lovasz distributed: rank {q}'s labels are {} and rank {me}'s {}: the ranks must pass the same label dtype",
                    label_dtype_name(a.unwrap_or(u64::MAX)),
                    label_dtype_name(b)
                )
            }
            let dims = |h: &[u64]| h.get(..3).map(<[u64]>::to_vec);
            bail!(
                "lovasz distributed: rank {q}'s loss call differs from rank {me}'s (dims [B, C, S] {:?} and {:?}; the loss, its classes, the layout and the dtype must agree too)",
                dims(theirs.get(1..).unwrap_or(&[])),
                dims(&head)
            )
        }
        if q == me {
            continue;
        }
        let mut rest = theirs[1 + n..].iter().copied();
        for v in sums.valid.iter_mut() {
            *v += rest.next().unwrap_or(0);
        }
        for c in sums.classes.iter_mut() {
            let len = rest.next().unwrap_or(0) as usize;
            if len != c.len() {
                bail!("lovasz distributed: rank {q} counted other classes (internal error)")
            }
            for v in c.iter_mut() {
                *v += rest.next().unwrap_or(0);
            }
        }
    }
    Plan::from_counts(
        call,
        sel,
        LabelCounts {
            classes: sums.classes,
            valid: sums.valid,
        },
    )
}

/// One job's error keys on one rank, split by ground truth, each ascending (descending
/// error order).
struct Lists {
    fg: Vec<u64>,
    bg: Vec<u64>,
}

/// Runs the jobs of the global `plan` ([`plan_global`]) over this rank's `data` and
/// `labels`: this rank's outputs, and in `losses` the loss over the union of every rank's
/// pixels (NaN on every rank when any rank's input holds a NaN).
pub(crate) fn solve_global<T: HostSort>(
    plan: &Plan,
    data: &[T],
    labels: &[u32],
    group: &dyn ProcessGroup,
) -> Result<Solved<T>> {
    let call = &plan.call;
    let (b_n, c_n, s_n) = call.dims;
    if data.len() != b_n * c_n * s_n || labels.len() != b_n * s_n || plan.groups.len() != 1 {
        bail!("lovasz distributed: inconsistent sizes (internal error)")
    }
    let p = &Slices { call, data, labels };
    let n = b_n * s_n;
    let width = std::mem::size_of::<T>();
    // Each job's own keys, sorted, and the message of their error keys.
    // Each job's own keys, sorted, and their error keys split by ground truth.
    let mut own = Vec::with_capacity(plan.jobs.len());
    let mut lists = Vec::with_capacity(plan.jobs.len());
    let mut scratch = Vec::new();
    for job in &plan.jobs {
        let mut keys: Vec<T::Packed> = zeroed(n);
        let (len, _) = build_keys(p, 0, 0..n, job.class, job.channel, &mut keys);
        keys.truncate(len);
        T::sort(&mut keys, &mut scratch);
        let (fg, bg): (Vec<T::Packed>, Vec<T::Packed>) =
            keys.iter().partition(|&&k| T::unpack(k).2);
        let error_keys = |v: Vec<T::Packed>| -> Vec<u64> {
            v.into_iter().map(|k| T::error_key(T::error(k))).collect()
        };
        lists.push(Lists {
            fg: error_keys(fg),
            bg: error_keys(bg),
        });
        own.push(keys);
    }
    // The global foreground floor of each job: past the smallest foreground error of the
    // union, a background pixel weighs exactly 0 and no other pixel's weight depends on
    // it, so such keys are neither sent nor walked.
    let floors = global_floors(plan, &lists, group)?;
    let mut message = Vec::new();
    for (l, &floor) in lists.iter_mut().zip(&floors) {
        l.bg.truncate(l.bg.partition_point(|&k| k <= floor));
        for list in [&l.fg, &l.bg] {
            message.extend((list.len() as u64).to_le_bytes());
            for &k in list {
                message.extend_from_slice(&k.to_le_bytes()[..width]);
            }
        }
    }
    drop(lists);
    let parts = group.all_gather(&message)?;
    drop(message);
    let me = group.rank();
    // Every other rank's lists, per job.
    let mut others: Vec<(usize, Vec<Lists>)> = Vec::new();
    for (q, part) in parts.iter().enumerate() {
        if q == me {
            continue;
        }
        others.push((q, parse_lists(part, plan.jobs.len(), width, q)?));
    }
    drop(parts);
    let mut values = vec![T::zero(); data.len()];
    let (mut offset, mut loss) = (0.0, 0.0);
    let shift = index_shift(s_n);
    for (j, (job, keys)) in plan.jobs.iter().zip(&own).enumerate() {
        // Per other rank: its foreground and background keys counted so far.
        let mut seen = vec![(0usize, 0usize); others.len()];
        let (mut fg_own, mut bg_own) = (0u64, 0u64);
        for &key in keys {
            let (index, slope, fg) = T::unpack(key);
            let err = T::error(key);
            let e = T::error_key(err);
            if e > floors[j] {
                // Background keys past the global foreground floor: weight 0.
                break;
            }
            let (mut fg_before, mut bg_before) = (fg_own, bg_own);
            for ((q, lists), (f, b)) in others.iter().zip(seen.iter_mut()) {
                let l = &lists[j];
                // Equal errors sort by rank: a lower rank's come first.
                let before = |k: u64| k < e || (k == e && *q < me);
                while *f < l.fg.len() && before(l.fg[*f]) {
                    *f += 1;
                }
                while *b < l.bg.len() && before(l.bg[*b]) {
                    *b += 1;
                }
                fg_before += *f as u64;
                bg_before += *b as u64;
            }
            let w = JaccardWalk::resume(job.gts, fg_before, bg_before).step(fg) * job.scale;
            let (image, pixel) = (index >> shift, index & ((1 << shift) - 1));
            let at = call.index(image, job.channel, pixel);
            values[at] = T::from_f64(match call.output {
                Output::Weights => w,
                Output::Linear => {
                    let (a, k, l) = call.kind.linear::<false>(w, err.to_f64(), slope, fg);
                    offset += k;
                    loss += l;
                    a
                }
            });
            if fg {
                fg_own += 1;
            } else {
                bg_own += 1;
            }
        }
    }
    let nan = data.iter().any(|v| v.is_nan());
    let mut sums = [loss, f64::from(u8::from(nan))];
    group.all_reduce_sum(ReduceBuffer::F64(&mut sums))?;
    let nan = sums[1] > 0.0;
    Ok(Solved {
        values,
        offsets: vec![offset],
        losses: vec![if nan { f64::NAN } else { sums[0] }],
        nan,
        unread_rows: Vec::new(),
    })
}

/// Per job, the largest foreground error key over every rank (the union's smallest
/// foreground error), or `u64::MAX` (nothing pruned) when the ranks' foreground keys are
/// not all of the job's foreground pixels: a job without any, or a hinge whose errors
/// `<= 0` were left out (the background after the last kept foreground key still weighs).
fn global_floors(plan: &Plan, lists: &[Lists], group: &dyn ProcessGroup) -> Result<Vec<u64>> {
    // Per job: 1 + the largest foreground key (0 for none), and the foreground keys.
    let mine: Vec<u8> = (lists.iter())
        .flat_map(|l| {
            let top = l.fg.last().map_or(0, |&k| k.saturating_add(1));
            [top, l.fg.len() as u64]
        })
        .flat_map(u64::to_le_bytes)
        .collect();
    let parts = group.all_gather(&mine)?;
    let mut floors = vec![(0u64, 0u64); lists.len()];
    for (q, part) in parts.iter().enumerate() {
        if part.len() != 16 * lists.len() {
            bail!("lovasz distributed: rank {q} sent the floors of other jobs (internal error)")
        }
        for (f, c) in floors.iter_mut().zip(part.chunks_exact(16)) {
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&c[8 * i..8 * i + 8]);
                u64::from_le_bytes(b)
            };
            *f = (f.0.max(word(0)), f.1 + word(1));
        }
    }
    Ok((floors.into_iter().zip(&plan.jobs))
        .map(|((top, fg), job)| {
            if top == 0 || fg != job.gts {
                u64::MAX
            } else {
                top - 1
            }
        })
        .collect())
}

/// Reads rank `q`'s message: for each of `jobs` jobs, a foreground and a background list
/// (a u64 length, then keys of `width` bytes).
fn parse_lists(bytes: &[u8], jobs: usize, width: usize, q: usize) -> Result<Vec<Lists>> {
    let mut at = 0;
    let mut take = |len: usize| -> Result<&[u8]> {
        match bytes.get(at..at + len) {
            Some(s) => {
                at += len;
                Ok(s)
            }
            None => bail!("lovasz distributed: rank {q}'s keys are cut short"),
        }
    };
    let mut out = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let mut two = [Vec::new(), Vec::new()];
        for list in two.iter_mut() {
            let mut len = [0u8; 8];
            len.copy_from_slice(take(8)?);
            let len = u64::from_le_bytes(len) as usize;
            let raw = take(len.saturating_mul(width))?;
            *list = (raw.chunks_exact(width))
                .map(|c| {
                    let mut k = [0u8; 8];
                    k[..width].copy_from_slice(c);
                    u64::from_le_bytes(k)
                })
                .collect();
        }
        let [fg, bg] = two;
        out.push(Lists { fg, bg });
    }
    Ok(out)
}
