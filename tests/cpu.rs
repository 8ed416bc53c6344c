//! Code paths that only some CPUs take, checked against the portable code on CPUs that have
//! them and reported as skipped (with the reason) on the others.

mod common;
use common::harness::{self, tests};
use common::noise;

fn main() {
    let tests = tests![the_interleaved_sha_rounds_match_one_at_a_time]
        .into_iter()
        .map(|t| t.unless(no_sha_extensions()))
        .collect();
    harness::run(tests)
}

/// Why this CPU cannot run the SHA-extension code, if it cannot.
fn no_sha_extensions() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        (!(std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse2")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")))
        .then(|| "this CPU has no SHA extensions".to_string())
    }
    #[cfg(not(target_arch = "x86_64"))]
    Some("the SHA-extension code is x86_64 only".to_string())
}

/// The two messages' interleaved rounds (`berth::sys::sha256_compress2`) give the states
/// `sha2`'s portable compression gives one message at a time.
fn the_interleaved_sha_rounds_match_one_at_a_time() {
    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    for blocks in [1, 2, 3, 97] {
        let (a, b) = (noise(64 * blocks, 1), noise(64 * blocks, 2));
        let (ab, _) = a.as_chunks::<64>();
        let (bb, _) = b.as_chunks::<64>();
        let (mut sa, mut sb) = (IV, IV);
        assert!(
            berth::sys::sha256_compress2(&mut sa, ab, &mut sb, bb),
            "the CPU has the extensions, yet the interleaved code declined"
        );
        let (mut ra, mut rb) = (IV, IV);
        sha2::block_api::compress256(&mut ra, ab);
        sha2::block_api::compress256(&mut rb, bb);
        assert_eq!((sa, sb), (ra, rb), "{blocks} blocks");
    }
}
