//! `NcclGroup` on one CUDA device, a world of one: every collective returns this rank's
//! own bytes and values, empty messages included, a root outside the world is an error,
//! and a job id is 128 bytes. Needs a GPU and libnccl.so.2: built with `--features nccl`
//! and run by `scripts/gpu-check.sh`.
#![cfg(feature = "nccl")]

use std::time::Duration;

use candle::Device;
use lovasz_candle::distributed::{NcclGroup, NcclId, ProcessGroup, ReduceBuffer};

mod common;

use common::Result;

#[test]
fn a_world_of_one_gathers_reduces_and_broadcasts_its_own_bytes() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let g = NcclGroup::single(dev.as_cuda_device()?)?.timeout(Duration::from_secs(60));
    assert_eq!((g.rank(), g.world_size()), (0, 1));

    assert_eq!(g.all_gather(&[1, 2, 3])?, [vec![1u8, 2, 3]]);
    assert_eq!(g.all_gather(&[])?, [Vec::<u8>::new()]);
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(g.all_gather(&big)?, vec![big]);

    let mut v = [1.5f64, -2.25];
    g.all_reduce_sum(ReduceBuffer::F64(&mut v))?;
    assert_eq!(v, [1.5, -2.25]);
    let mut f = [0.5f32; 5];
    g.all_reduce_sum(ReduceBuffer::F32(&mut f))?;
    assert_eq!(f, [0.5; 5]);
    let mut u = [7u64];
    g.all_reduce_sum(ReduceBuffer::U64(&mut u))?;
    assert_eq!(u, [7]);

    let mut b = vec![9u8, 8, 7];
    g.broadcast(&mut b, 0)?;
    assert_eq!(b, [9, 8, 7]);
    let err = g.broadcast(&mut b, 1).unwrap_err().to_string();
    assert!(err.contains("root 1"), "{err}");
    let mut empty = Vec::new();
    g.broadcast(&mut empty, 0)?;
    assert!(empty.is_empty());
    // The group still works after the refused call.
    assert_eq!(g.all_gather(&[4])?, [vec![4u8]]);
    Ok(())
}

#[test]
fn job_ids_are_128_bytes() -> Result<()> {
    let id = NcclId::new()?;
    let bytes = id.to_bytes();
    assert_eq!(bytes.len(), 128);
    assert_eq!(NcclId::from_bytes(&bytes)?.to_bytes(), bytes);
    let err = NcclId::from_bytes(&bytes[..5]).unwrap_err().to_string();
    assert!(err.contains("128 bytes, got 5"), "{err}");
    Ok(())
}
