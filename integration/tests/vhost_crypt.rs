//! Encryption at rest under a real guest (issue 15, "Encryption with a
//! real guest"): QEMU (TCG) boots the stock Debian kernel on
//! `vhost-user-blk-pci`, served by `vrio-client vhost-user-blk`, whose
//! I/O server, `vrio-server --disk file --policy 0=crypt.json`, encrypts
//! the device's sectors (AES-XTS-256, the sector number as tweak) before
//! they reach the backing file. The guest is unmodified: it sees plaintext.
//!
//! Boot 1 (`crypt.sh`, cryptphase=1, fresh image): fio randwrite 4 KiB
//! with crc32c verify, a raw O_DIRECT region of marker lines
//! ("VRIO-PLAINTEXT-MARKER") read back, ext4 (mkfs, random files, a file
//! of marker lines, their md5s in /SUMS, sync, remount, md5 check,
//! e2fsck -fn in the guest), no I/O error in the kernel log.
//!
//! Then the host: the backing file holds no marker (run.sh's grep and a
//! scan here) and no ext4 superblock, yet decrypted here with the key
//! (`XtsStage`: what the same flow writes without encryption) it holds the
//! markers, and `e2fsck -fn` and `debugfs` on the decrypted copy find the
//! guest's file system and files (the md5s the guest printed).
//!
//! Boot 2 (cryptphase=2): vrio-server and vrio-client start again with the
//! same key on the same image; the guest checks e2fsck, mounts, compares
//! every file with /SUMS (and the host compares the md5s with boot 1's),
//! the raw marker region (O_DIRECT), re-verifies boot 1's fio blocks
//! (`--verify_only`) and finds its kernel log clean.
//!
//! Everything runs from `integration/vhost/run.sh` (`CRYPT_KEY`,
//! `DISK_IMAGE`, `FIO=1`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vrio_core::interpose::XtsStage;
use vrio_integration::vhost::{require_tools, run_script, vrio_binaries};

/// The test's key: 64 bytes (data key, tweak key) as 128 hex digits.
const KEY: &str = "6b2f0e51a39c4d78e0125f6a9b3c7d41f80e2a6c5b9d1347a8e6f0c2b4d69e13\
                   3d8a1f6e0b7c29d45e9a0f1b6c3d8e72a4f9051c7e3b6d28f1a09c5e7b2d4f86";
const MARKER: &str = "VRIO-PLAINTEXT-MARKER";
/// crypt.sh's layout (its defaults): ext4 on the first 128 MiB, the raw
/// marker region of 4 MiB at 192 MiB, fio's 16 MiB at 160 MiB.
const DISK_MIB: u64 = 256;
const RAW_OFF_MIB: u64 = 192;
const RAW_MIB: u64 = 4;
/// Whole marker lines ("MARKER\n") in the raw region and in /marker.txt.
const RAW_MARKERS: usize = (RAW_MIB as usize) * 1048576 / (MARKER.len() + 1);
const FILE_MARKERS: usize = 1048576 / (MARKER.len() + 1);

/// A directory of the test's own, removed at the end (kept with KEEP=1).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vrio-{tag}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// vrio-server and vrio-client (and vrio-ctl, which run.sh finds next to
/// vrio-server), built once; the host's tools checked.
fn binaries() -> (PathBuf, PathBuf) {
    require_tools(
        "the vhost-user-blk guest",
        &["mke2fs", "e2fsck", "debugfs", "md5sum", "qemu-img", "fio"],
    );
    vrio_binaries()
}

/// Runs `integration/vhost/run.sh` with `env` and `crypt.sh`; returns its
/// whole output and whether it exited successfully.
fn run_guest(bins: &(PathBuf, PathBuf), env: &[(&str, &str)]) -> (String, bool) {
    run_script("run.sh", "crypt.sh", bins, env)
}

/// One boot of crypt.sh in `phase` on the encrypted `image`.
fn boot(bins: &(PathBuf, PathBuf), image: &Path, phase: u32) -> (String, bool) {
    let append = format!("cryptphase={phase}");
    run_guest(
        bins,
        &[
            ("NQ", "2"),
            ("BOOTS", "1"),
            ("FIO", "1"),
            ("TMO", "240"),
            ("DISKMB", "256"),
            ("FSMB", "128"),
            ("CRYPT_KEY", KEY),
            ("DISK_IMAGE", image.to_str().unwrap()),
            ("APPEND", &append),
            ("SERIAL_TAIL", "80"),
        ],
    )
}

/// What every boot must show: the server encrypted the client's device,
/// served it remotely and refused nothing, the guest's checks and run.sh
/// passed, no marker in the backing file, and the key in no log.
fn assert_encrypted_boot(log: &str, ok: bool, phase: u32) {
    let has = |s: &str| log.contains(s);
    let fail = log.lines().find(|l| l.contains("FAIL "));
    assert!(
        fail.is_none(),
        "boot {phase}: the guest reported a failure: {}",
        fail.unwrap_or_default()
    );
    assert!(
        has("vrio-server: device 0x0 (dev0.q0): interposition crypt"),
        "boot {phase}: the server did not put the crypt stage on device 0"
    );
    assert!(
        has("(fabric soft, 2 queue(s)"),
        "boot {phase}: vrio-client did not serve the socket remotely"
    );
    assert!(
        has(" requests (0 refused)"),
        "boot {phase}: the server refused requests"
    );
    assert!(
        has("2 queue(s), crypt phase"),
        "boot {phase}: the guest driver did not get two queues"
    );
    assert!(
        has(&format!("CRYPT PHASE {phase} OK")),
        "boot {phase}: the guest's checks failed"
    );
    assert!(
        has("CRYPT DMESG CLEAN"),
        "boot {phase}: I/O errors in the guest's kernel log"
    );
    assert!(has("GUEST E2FSCK OK"), "boot {phase}: e2fsck in the guest");
    assert!(
        has("VRIO-GUEST-DONE rc=0"),
        "boot {phase}: guest script failed"
    );
    assert!(
        has("HOST MARKER count=0 "),
        "boot {phase}: run.sh found the marker in the encrypted backing file"
    );
    assert!(
        has("HOST NO PLAINTEXT EXT4 SUPERBLOCK"),
        "boot {phase}: the backing file shows a plaintext ext4 superblock"
    );
    // Neither half of the key leaks into a log (the policy file is run.sh's).
    assert!(
        !has(&KEY[..64]) && !has(&KEY[64..]),
        "boot {phase}: the key appears in the logs"
    );
    assert!(has("RESULT: PASS"), "boot {phase}: run.sh result");
    assert!(ok, "boot {phase}: run.sh failed");
}

/// The guest's "FILE /name md5=..." lines, sorted.
fn file_sums(log: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = log
        .lines()
        .filter_map(|l| l.split("FILE /").nth(1))
        .filter_map(|s| {
            let (name, sum) = s.split_once(" md5=")?;
            Some((name.to_string(), sum.trim().to_string()))
        })
        .collect();
    v.sort();
    v
}

/// Occurrences of `needle` in `hay`.
fn count(hay: &[u8], needle: &[u8]) -> usize {
    let (mut n, mut i) = (0, 0);
    while let Some(p) = hay[i..].iter().position(|&b| b == needle[0]) {
        let s = i + p;
        if hay[s..].starts_with(needle) {
            n += 1;
            i = s + needle.len();
        } else {
            i = s + 1;
        }
    }
    n
}

/// The plaintexts the scans look for: the marker, and /dir/sub/hello.
const NEEDLES: [&str; 2] = [MARKER, "hello from the guest"];

/// Scans `image` in 1 MiB chunks: the chunks holding data go through
/// `f(offset, chunk)`, which may change them (decrypt); returns the
/// count of each of [`NEEDLES`] (after `f`) and the number of non-zero
/// 512-byte sectors.
fn scan(image: &Path, mut f: impl FnMut(u64, &mut [u8])) -> ([usize; 2], u64) {
    let mut file = File::open(image).unwrap();
    let (mut found, mut sectors) = ([0; 2], 0);
    let keep = NEEDLES.iter().map(|n| n.len()).max().unwrap() - 1;
    // The last bytes of the previous chunk: a needle may straddle two.
    let mut buf = vec![0u8; keep + (1 << 20)];
    let mut carried = 0;
    let mut off = 0u64;
    loop {
        let chunk = &mut buf[keep..];
        let n = read_full(&mut file, chunk);
        if n == 0 {
            break;
        }
        let chunk = &mut chunk[..n];
        if chunk.iter().any(|&b| b != 0) {
            sectors += chunk
                .chunks(512)
                .filter(|s| s.iter().any(|&b| b != 0))
                .count() as u64;
            f(off, chunk);
            for (c, needle) in found.iter_mut().zip(NEEDLES) {
                *c += count(&buf[keep - carried..keep + n], needle.as_bytes());
            }
            carried = keep.min(n);
            buf.copy_within(keep + n - carried..keep + n, keep - carried);
        } else {
            carried = 0;
        }
        off += n as u64;
    }
    (found, sectors)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn xts(key: &str) -> XtsStage {
    let bytes: Vec<u8> = (0..64)
        .map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    XtsStage::new(&bytes.try_into().unwrap()).unwrap()
}

/// md5 of `debugfs -R "cat PATH" image`.
fn debugfs_md5(image: &Path, path: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "debugfs -R 'cat {path}' '{}' 2>/dev/null | md5sum | cut -d' ' -f1",
            image.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The ext4 magic 0xef53 at byte 1080 of `image`.
fn has_ext4_magic(image: &Path) -> bool {
    let mut m = [0u8; 2];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut m, 1080)
        .unwrap();
    m == [0x53, 0xef]
}

#[test]
fn an_unmodified_guest_runs_on_an_encrypted_remote_disk_and_reads_it_back_after_a_restart() {
    let bins = binaries();
    let t0 = std::time::Instant::now();
    let dir = TempDir::new("crypt");
    let image = dir.0.join("disk.raw");

    // Boot 1: a fresh encrypted disk.
    let (log1, ok) = boot(&bins, &image, 1);
    println!("[{:.1} s] boot 1 done", t0.elapsed().as_secs_f64());
    assert_encrypted_boot(&log1, ok, 1);
    assert!(
        log1.contains("FIO VERIFY OK"),
        "fio crc32c verify in boot 1"
    );
    let raw = format!(
        "RAW MARKER md5={0} direct={0} ",
        log1.lines()
            .find_map(|l| l.split("RAW MARKER md5=").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .expect("no raw marker line from boot 1")
    );
    assert!(log1.contains(&raw), "the raw marker region read back");
    let sums1 = file_sums(&log1);
    assert_eq!(sums1.len(), 7, "boot 1's files: {sums1:?}");

    // The host: only ciphertext in the image.
    let len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(len, DISK_MIB << 20, "the image's size");
    assert!(!has_ext4_magic(&image), "a plaintext ext4 superblock");
    let ([in_image, hello], written) = scan(&image, |_, _| {});
    println!(
        "[{:.1} s] host: the encrypted image holds {in_image} marker(s) and {hello} \"hello from the guest\" in {written} written sector(s) ({} MiB)",
        t0.elapsed().as_secs_f64(),
        written / 2048
    );
    assert_eq!(in_image, 0, "the marker is in the encrypted image");
    assert_eq!(hello, 0, "/dir/sub/hello is in the encrypted image");
    // The guest wrote at least fio's 16 MiB, the raw 4 MiB and ext4's 16+
    // MiB of files: the scan saw data, and it was not plaintext.
    assert!(written >= 36 * 2048, "only {written} sectors written");

    // The control: the same image decrypted with the key is what the
    // unencrypted flow writes; there the markers, the file system and its
    // files are.
    let plain = dir.0.join("decrypted.raw");
    {
        let out = File::create(&plain).unwrap();
        out.set_len(len).unwrap();
        let x = xts(KEY);
        let ([markers, hello], _) = scan(&image, |off, chunk| {
            x.decrypt(off / 512, chunk);
            out.write_all_at(chunk, off).unwrap();
        });
        println!(
            "[{:.1} s] host: the image decrypted with the key holds {markers} marker(s) (raw region {RAW_MARKERS}, /marker.txt {FILE_MARKERS}) and {hello} \"hello from the guest\"",
            t0.elapsed().as_secs_f64()
        );
        assert!(
            markers >= RAW_MARKERS + FILE_MARKERS * 9 / 10,
            "the decrypted image holds {markers} markers"
        );
        assert!(hello >= 1, "no /dir/sub/hello in the decrypted image");
    }
    assert!(has_ext4_magic(&plain), "no ext4 superblock once decrypted");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&plain)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the decrypted image: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    println!(
        "[{:.1} s] host: e2fsck -fn of the decrypted image: clean",
        t0.elapsed().as_secs_f64()
    );
    for (name, sum) in &sums1 {
        assert_eq!(
            &debugfs_md5(&plain, &format!("/{name}")),
            sum,
            "/{name} in the decrypted image"
        );
    }
    println!(
        "[{:.1} s] host: debugfs reads the guest's {} files from the decrypted image, md5s match",
        t0.elapsed().as_secs_f64(),
        sums1.len()
    );
    // Another key decrypts to noise: no marker in the raw region.
    {
        let other = xts(&format!("{}{}", &KEY[64..], &KEY[..64]));
        let mut region = vec![0u8; (RAW_MIB << 20) as usize];
        File::open(&image)
            .unwrap()
            .read_exact_at(&mut region, RAW_OFF_MIB << 20)
            .unwrap();
        other.decrypt((RAW_OFF_MIB << 20) / 512, &mut region);
        assert_eq!(count(&region, MARKER.as_bytes()), 0, "a wrong key decrypts");
    }
    std::fs::remove_file(&plain).unwrap();

    // Boot 2: a new server and client, the same key and image.
    println!("[{:.1} s] host checks done", t0.elapsed().as_secs_f64());
    let (log2, ok) = boot(&bins, &image, 2);
    assert_encrypted_boot(&log2, ok, 2);
    assert!(
        log2.contains("GUEST E2FSCK OK (before mounting)"),
        "e2fsck before mounting in boot 2"
    );
    assert!(
        log2.contains("SUMS OK 7 file(s) match phase 1's md5s"),
        "boot 2's files against /SUMS"
    );
    let sums2 = file_sums(&log2);
    assert_eq!(sums2, sums1, "boot 2 read other files than boot 1 wrote");
    assert!(
        log2.contains(&format!("MARKER FILE OK {FILE_MARKERS} line(s)")),
        "/marker.txt in boot 2"
    );
    assert!(log2.contains(&raw), "the raw marker region in boot 2");
    assert!(
        log2.contains("FIO VERIFY-ONLY OK"),
        "boot 1's fio blocks in boot 2"
    );
    println!(
        "crypt: boot 2 read back boot 1's {} files (md5s equal), the raw marker region and fio's crc32c blocks; {:.1} s in all",
        sums2.len(),
        t0.elapsed().as_secs_f64()
    );
}
