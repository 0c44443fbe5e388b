//! Data-parallel training over the ranks of a process group: each rank holds a replica of
//! the U-Net, takes its shard of every global batch, and the gradients are averaged over
//! the ranks in buckets. The Lovász-Softmax per batch is the one over the global batch
//! (`lovasz_candle::distributed`), so the ranks optimise the same loss as one process.

use std::sync::Arc;

use candle::backprop::GradStore;
use candle::{Tensor, Var};
use lovasz_candle::distributed::{ProcessGroup, ReduceBuffer};

use crate::{Error, Result};

/// Gradient values summed over the ranks per call: the bucket size of the all-reduce.
pub const BUCKET_VALUES: usize = 1 << 20;

/// A trainer's place in a data-parallel job.
#[derive(Clone)]
pub struct DataParallel {
    group: Arc<dyn ProcessGroup>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataParallel(rank {} of {})",
            self.group.rank(),
            self.group.world_size()
        )
    }
}

impl DataParallel {
    /// This process's rank in `group`.
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        DataParallel { group }
    }

    /// The process group.
    pub fn group(&self) -> &dyn ProcessGroup {
        self.group.as_ref()
    }

    /// The process group, shared.
    pub(crate) fn shared_group(&self) -> Arc<dyn ProcessGroup> {
        self.group.clone()
    }

    /// The rank that logs and writes the run folder.
    pub fn is_lead(&self) -> bool {
        self.group.rank() == 0
    }

    /// Fails on every rank unless every rank passed the same `value` (the run's
    /// configuration as JSON, say): the error names the first field where a rank
    /// differs from rank 0, with both values. Call it before anything that could make
    /// the ranks part ways (writing a run folder, the first collective of training), so
    /// that ranks started differently end together with one message instead of waiting
    /// on each other.
    pub fn agree(&self, value: &serde_json::Value) -> Result<()> {
        let parts = self.group.all_gather(value.to_string().as_bytes())?;
        let mut ranks = parts.iter().map(|p| serde_json::from_slice(p));
        let lead: serde_json::Value = match ranks.next() {
            Some(Ok(v)) => v,
            _ => return Err(Error::Usage("rank 0 sent no configuration".into())),
        };
        for (r, v) in ranks.enumerate() {
            let v: serde_json::Value =
                v.map_err(|e| Error::Usage(format!("rank {} sent no configuration: {e}", r + 1)))?;
            if let Some((path, a, b)) = first_difference(&lead, &v, String::new()) {
                return Err(Error::Usage(format!(
                    "the ranks were started differently: {path} is {a} on rank 0 and {b} on rank {}",
                    r + 1
                )));
            }
        }
        Ok(())
    }

    /// Fails unless the ranks divide `batch_size`, the global batch.
    pub fn check_batch(&self, batch_size: usize) -> Result<()> {
        let n = self.group.world_size();
        if !batch_size.is_multiple_of(n) {
            return Err(Error::Usage(format!(
                "--batch-size {batch_size} is the global batch and must be a multiple of the {n} ranks"
            )));
        }
        Ok(())
    }

    /// This rank's shard of a global batch: images `[B, C, H, W]` and masks `[B, H, W]`
    /// narrowed to the rank's `B / N` images (rank `r`: images `r·B/N ..`).
    pub(super) fn shard(&self, images: &Tensor, masks: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.group.world_size();
        let b = images.dim(0)?;
        if !b.is_multiple_of(n) {
            return Err(Error::Usage(format!(
                "a batch of {b} images does not split over {n} ranks (the last batch of an epoch? use a batch size that divides the training split, or drop the last batch)"
            )));
        }
        let (r, k) = (self.group.rank(), b / n);
        Ok((images.narrow(0, r * k, k)?, masks.narrow(0, r * k, k)?))
    }

    /// Rank 0's values of `vars` on every rank.
    pub(super) fn broadcast(&self, vars: &[(String, Var)]) -> Result<()> {
        for (name, var) in vars {
            let t = var.as_tensor();
            let mut bytes: Vec<u8> = (t.flatten_all()?.to_dtype(candle::DType::F32)?)
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            self.group.broadcast(&mut bytes, 0)?;
            if bytes.len() != 4 * t.elem_count() {
                return Err(Error::Usage(format!(
                    "rank 0's {name} has {} values, this rank's {}: the ranks' models differ",
                    bytes.len() / 4,
                    t.elem_count()
                )));
            }
            let values: Vec<f32> = (bytes.chunks_exact(4))
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let v = Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
            var.set(&v)?;
        }
        Ok(())
    }

    /// Replaces the gradient of each of `vars` in `grads` by its mean over the ranks, in
    /// all-reduces of [`BUCKET_VALUES`] values (a variable without a gradient counts as
    /// zeros, so every rank sends the same layout).
    pub(super) fn average_gradients(
        &self,
        grads: &mut GradStore,
        vars: &[(String, Var)],
    ) -> Result<()> {
        let mut flat = Vec::new();
        for (_, var) in vars {
            let t = var.as_tensor();
            match grads.get(t) {
                Some(g) => flat.extend(
                    g.flatten_all()?
                        .to_dtype(candle::DType::F32)?
                        .to_vec1::<f32>()?,
                ),
                None => flat.extend(std::iter::repeat_n(0f32, t.elem_count())),
            }
        }
        for bucket in flat.chunks_mut(BUCKET_VALUES) {
            self.group.all_reduce_sum(ReduceBuffer::F32(bucket))?;
        }
        let scale = 1.0 / self.group.world_size() as f32;
        let mut at = 0;
        for (_, var) in vars {
            let t = var.as_tensor();
            let n = t.elem_count();
            let mean: Vec<f32> = flat[at..at + n].iter().map(|v| v * scale).collect();
            at += n;
            let g = Tensor::from_vec(mean, t.shape(), t.device())?.to_dtype(t.dtype())?;
            grads.insert(t, g);
        }
        Ok(())
    }
}

/// The first place (a dotted path of object keys and array indices) where `a` and `b`
/// differ, with the two values there.
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: String,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let vb = y.get(k).unwrap_or(&Value::Null);
                if let Some(d) = first_difference(va, vb, join(k)) {
                    return Some(d);
                }
            }
            let extra = y.iter().find(|(k, _)| !x.contains_key(*k));
            extra.map(|(k, v)| (join(k), "null".into(), v.to_string()))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => (x.iter().zip(y))
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, join(&i.to_string()))),
        _ if a == b => None,
        _ => Some((
            if path.is_empty() {
                "the configuration".into()
            } else {
                path
            },
            a.to_string(),
            b.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lovasz_candle::distributed::LocalGroup;
    use serde_json::json;

    #[test]
    fn first_difference_names_the_field() {
        let a = json!({"train": {"batch_size": 4, "crop": [8, 8]}, "resume": null});
        assert_eq!(first_difference(&a, &a, String::new()), None);
        let b = json!({"train": {"batch_size": 3, "crop": [8, 8]}, "resume": null});
        assert_eq!(
            first_difference(&a, &b, String::new()),
            Some(("train.batch_size".into(), "4".into(), "3".into()))
        );
        let c = json!({"train": {"batch_size": 4, "crop": [8, 9]}, "resume": null});
        assert_eq!(
            first_difference(&a, &c, String::new()).unwrap().0,
            "train.crop.1"
        );
        let d = json!({"train": {"batch_size": 4, "crop": [8, 8]}, "resume": "x"});
        assert_eq!(
            first_difference(&a, &d, String::new()).unwrap(),
            ("resume".into(), "null".into(), "\"x\"".into())
        );
    }

    #[test]
    fn ranks_started_differently_fail_together() {
        let errors: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (LocalGroup::new(3).unwrap().into_iter())
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank();
                        let p = DataParallel::new(Arc::new(g));
                        p.agree(&json!({"same": 1, "seed": 7})).unwrap();
                        let seed = if r == 2 { 8 } else { 7 };
                        p.agree(&json!({"same": 1, "seed": seed}))
                            .unwrap_err()
                            .to_string()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for e in &errors {
            assert!(e.contains("seed is 7 on rank 0 and 8 on rank 2"), "{e}");
        }
    }
}
