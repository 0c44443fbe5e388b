//! The batcher: tensor shapes and dtypes, reproducible shuffles, prefetch equivalence,
//! last-batch policy and errors.

use std::sync::Arc;

use candle::{DType, Tensor};
use datasets::{
    Batcher, Dataset, Error, Result, Sample, ShapesConfig, ShapesDataset, Transform,
    TransformConfig,
};

fn shapes(len: usize) -> Arc<dyn Dataset> {
    Arc::new(ShapesDataset::new(ShapesConfig {
        len,
        height: 16,
        width: 16,
        ..Default::default()
    }))
}

fn collect(b: &Batcher, epoch: usize) -> Vec<(Vec<f32>, Vec<u32>)> {
    b.epoch(epoch)
        .map(|r| {
            let (x, y) = r.unwrap();
            (
                x.flatten_all().unwrap().to_vec1().unwrap(),
                y.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn batches_have_the_documented_shapes() {
    let b = Batcher::new(shapes(10)).batch_size(4);
    let batches: Vec<(Tensor, Tensor)> = b.epoch(0).map(|r| r.unwrap()).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].0.dims(), [4, 3, 16, 16]);
    assert_eq!(batches[0].0.dtype(), DType::F32);
    assert_eq!(batches[0].1.dims(), [4, 16, 16]);
    assert_eq!(batches[0].1.dtype(), DType::U32);
    assert_eq!(batches[2].0.dims()[0], 2);
    assert_eq!(b.clone().drop_last(true).epoch(0).count(), 2);
    assert_eq!(b.clone().drop_last(true).num_batches(), 2);
}

#[test]
fn shuffle_is_reproducible_per_seed_and_epoch() {
    let t = Transform::new(TransformConfig {
        hflip: 0.5,
        crop: Some((12, 12)),
        ..Default::default()
    })
    .unwrap();
    let b = Batcher::new(shapes(12))
        .batch_size(5)
        .shuffle(9)
        .transform(t);
    assert_eq!(b.order(3), b.clone().order(3));
    assert_ne!(b.order(0), b.order(1));
    assert_ne!(b.order(0), b.clone().shuffle(10).order(0));
    let mut sorted = b.order(2);
    sorted.sort();
    assert_eq!(sorted, (0..12).collect::<Vec<_>>());
    assert_eq!(collect(&b, 1), collect(&b, 1));
    assert_ne!(collect(&b, 0), collect(&b, 1));
    // Augmentation depends on (seed, epoch, index), not on the batch size.
    let whole: Vec<f32> = collect(&b.clone().batch_size(12), 1)
        .into_iter()
        .flat_map(|p| p.0)
        .collect();
    let parts: Vec<f32> = collect(&b, 1).into_iter().flat_map(|p| p.0).collect();
    assert_eq!(whole, parts);
    assert_eq!(Batcher::new(shapes(5)).order(0), vec![0, 1, 2, 3, 4]);
}

#[test]
fn prefetch_gives_the_same_batches() {
    let b = Batcher::new(shapes(9)).batch_size(2).shuffle(1);
    assert_eq!(collect(&b, 4), collect(&b.clone().prefetch(true), 4));
    // Dropping a prefetching epoch early does not hang.
    let mut e = b.prefetch(true).epoch(0);
    assert!(e.next().is_some());
    drop(e);
}

/// Two samples of different sizes, or a failing sample.
struct Uneven;

impl Dataset for Uneven {
    fn len(&self) -> usize {
        3
    }
    fn get(&self, i: usize) -> Result<Sample> {
        match i {
            0 => Sample::new(vec![0.0; 4], vec![0; 4], 1, 2, 2),
            1 => Sample::new(vec![0.0; 6], vec![0; 6], 1, 2, 3),
            _ => Err(Error::Other(anyhow::anyhow!("sample 2 is broken").into())),
        }
    }
    fn num_classes(&self) -> usize {
        2
    }
    fn channels(&self) -> usize {
        1
    }
    fn class_names(&self) -> Vec<String> {
        vec!["a".into(), "b".into()]
    }
}

#[test]
fn errors_are_reported_not_panicked() {
    for prefetch in [false, true] {
        let b = Batcher::new(Arc::new(Uneven))
            .batch_size(2)
            .prefetch(prefetch);
        let results: Vec<_> = b.epoch(0).collect();
        assert_eq!(results.len(), 1, "stops at the first error");
        let msg = results[0].as_ref().unwrap_err().to_string();
        assert!(
            msg.contains("differ in shape") && msg.contains("crop"),
            "{msg}"
        );

        let crop = Transform::new(TransformConfig {
            crop: Some((2, 2)),
            ..Default::default()
        })
        .unwrap();
        let b = b.transform(crop);
        let results: Vec<_> = b.epoch(0).collect();
        assert!(results[0].is_ok());
        assert!(results[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("broken"));
    }
    let zero: Vec<_> = Batcher::new(shapes(3)).batch_size(0).epoch(0).collect();
    assert!(zero.len() == 1 && zero[0].is_err());
}

/// Classes present in each batch of `epoch` (masks as returned by the batcher).
fn classes_per_batch(b: &Batcher, epoch: usize, n_classes: usize) -> Vec<usize> {
    b.epoch(epoch)
        .map(|r| {
            let (_, masks) = r.unwrap();
            let masks: Vec<u32> = masks.flatten_all().unwrap().to_vec1().unwrap();
            datasets::ClassPresence::of_mask(&masks, n_classes).len()
        })
        .collect()
}

#[test]
fn equibatch_puts_more_classes_in_each_batch_than_a_shuffle() {
    // The brain training split: 15 classes, the smallest structures in few slices.
    let ds: Arc<dyn Dataset> =
        Arc::new(datasets::BrainSlices::load(datasets::Split::Train).unwrap());
    let k = ds.num_classes();
    let shuffled = Batcher::new(Arc::clone(&ds)).batch_size(4).shuffle(7);
    let equi = Batcher::new(Arc::clone(&ds))
        .batch_size(4)
        .equibatch(7)
        .unwrap();
    let (mut plain, mut spread, mut plain_min, mut spread_min) = (0, 0, usize::MAX, usize::MAX);
    for epoch in 0..4 {
        let order = equi.order(epoch);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..ds.len()).collect::<Vec<_>>(),
            "every slice once"
        );
        assert_eq!(order, equi.order(epoch), "reproducible");
        let a = classes_per_batch(&shuffled, epoch, k);
        let b = classes_per_batch(&equi, epoch, k);
        assert_eq!(a.len(), b.len());
        plain += a.iter().sum::<usize>();
        spread += b.iter().sum::<usize>();
        plain_min = plain_min.min(*a.iter().min().unwrap());
        spread_min = spread_min.min(*b.iter().min().unwrap());
    }
    assert!(
        spread > plain,
        "classes per batch: equibatch {spread}, shuffle {plain}"
    );
    assert!(
        spread_min >= plain_min,
        "fewest classes in a batch: {spread_min} vs {plain_min}"
    );
}

#[test]
fn equibatch_with_known_classes_gives_the_same_order() {
    let ds = shapes(12);
    let k = ds.num_classes();
    let classes: Vec<Vec<u32>> = (0..ds.len())
        .map(|i| datasets::ClassPresence::of_mask(&ds.get(i).unwrap().mask, k))
        .collect();
    let presence = datasets::ClassPresence::new(classes, k);
    let scanned = Batcher::new(Arc::clone(&ds))
        .batch_size(4)
        .equibatch(3)
        .unwrap();
    let given = Batcher::new(Arc::clone(&ds))
        .batch_size(4)
        .equibatch_with(presence.clone(), 3)
        .unwrap();
    for epoch in 0..3 {
        assert_eq!(scanned.order(epoch), given.order(epoch));
    }
    let short = datasets::ClassPresence::new(vec![vec![0]; 5], k);
    let err = Batcher::new(ds).equibatch_with(short, 3).unwrap_err();
    assert!(err.to_string().contains("5 samples"), "{err}");
}
