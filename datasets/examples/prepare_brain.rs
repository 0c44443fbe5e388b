//! Regenerates `datasets/data/brain/slices.bin.gz` from Debian's `mricron-data` package.
//!
//! ```text
//! cd /tmp && apt-get download mricron-data && dpkg -x mricron-data_*.deb mricron
//! cargo run -p datasets --example prepare_brain -- --deb-dir /tmp/mricron
//! ```
//!
//! Reads `usr/share/mricron/templates/{ch2.nii.gz, aal.nii.gz, aal.nii.txt}` under
//! `--deb-dir`, merges the AAL regions into 15 classes, keeps the axial slices with a
//! label, downsamples them to 2 mm, pads them to 112 x 96, writes the compressed file
//! and prints per-split slice counts and class shares. (The library embeds the file it
//! writes, so a placeholder must exist to compile this example: `touch` it if missing.)

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use datasets::brain::format::PreparedSlices;
use datasets::brain::prepare::{aal_lookup, prepare_slices};
use datasets::brain::{split_of_slice, CLASS_NAMES};
use datasets::nifti::read_nifti;
use datasets::Split;

#[derive(Parser, Debug)]
#[command(about = "Prepare the embedded brain MRI slices from the mricron-data package")]
struct Args {
    /// Folder where the .deb was extracted (`dpkg -x`); the templates folder itself works too.
    #[arg(long)]
    deb_dir: PathBuf,
    /// Output folder for slices.bin.gz.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/brain"))]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nested = args.deb_dir.join("usr/share/mricron/templates");
    let dir = if nested.is_dir() {
        nested
    } else {
        args.deb_dir.clone()
    };
    if !dir.join("ch2.nii.gz").is_file() {
        bail!(
            "no ch2.nii.gz in {} nor in {}: pass the folder where mricron-data_*.deb was extracted with dpkg -x",
            args.deb_dir.join("usr/share/mricron/templates").display(),
            args.deb_dir.display()
        );
    }
    let t1 = read_nifti(&dir.join("ch2.nii.gz"))?;
    let atlas = read_nifti(&dir.join("aal.nii.gz"))?;
    let names_path = dir.join("aal.nii.txt");
    let names = std::fs::read_to_string(&names_path)
        .with_context(|| format!("cannot read {}", names_path.display()))?;
    let lut = aal_lookup(&names, &names_path)?;
    println!(
        "T1 {:?} voxels of {:?} mm, atlas {:?}",
        t1.dims, t1.pixdim, atlas.dims
    );

    let prepared = prepare_slices(&t1, &atlas, &lut)?;
    let bytes = prepared.encode()?;
    if PreparedSlices::decode(&bytes).as_ref() != Ok(&prepared) {
        bail!("the encoded file does not decode to the prepared slices");
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("slices.bin.gz");
    std::fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "{} slices (z = {}..={}) of {}x{} -> {} ({} bytes)",
        prepared.len(),
        prepared.z.first().copied().unwrap_or(0),
        prepared.z.last().copied().unwrap_or(0),
        prepared.height,
        prepared.width,
        path.display(),
        bytes.len()
    );

    let n = prepared.height * prepared.width;
    let k = CLASS_NAMES.len();
    let mut missing = Vec::new();
    print!("{:12}", "class");
    for split in Split::ALL {
        let count = (0..prepared.len())
            .filter(|&i| split_of_slice(i) == split)
            .count();
        print!(" {:>14}", format!("{split} ({count})"));
    }
    println!();
    let mut table = vec![[0u64; 3]; k];
    for (i, labels) in prepared.labels.chunks_exact(n).enumerate() {
        let s = Split::ALL
            .iter()
            .position(|&s| s == split_of_slice(i))
            .unwrap_or(0);
        for &l in labels {
            table[l as usize][s] += 1;
        }
    }
    let totals: Vec<u64> = (0..3).map(|s| table.iter().map(|r| r[s]).sum()).collect();
    for (class, row) in table.iter().enumerate() {
        print!("{:12}", CLASS_NAMES[class]);
        for (s, split) in Split::ALL.iter().enumerate() {
            print!(
                " {:>13.3}%",
                100.0 * row[s] as f64 / totals[s].max(1) as f64
            );
            if row[s] == 0 {
                missing.push(format!("{} in {split}", CLASS_NAMES[class]));
            }
        }
        println!();
    }
    if !missing.is_empty() {
        bail!("classes missing from a split: {}", missing.join(", "));
    }
    Ok(())
}
