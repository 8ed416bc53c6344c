//! Which device nodes a container may use: docker's defaults. Any node may be created
//! (CAP_MKNOD is in the default capability set, and images carry device nodes), but only a few
//! harmless ones may be opened; without this a container's root could `mknod` the host's disk
//! and read it.
//!
//! On cgroup v1 the rules go to the devices controller (see `cgroup.rs`). Cgroup v2 has no file
//! interface for this: the kernel asks an eBPF program of type `BPF_PROG_TYPE_CGROUP_DEVICE`
//! attached to the container's cgroup, which [`program`] assembles from the same rules (as runc
//! and crun do). The system calls themselves are in `crate::sys`.

use crate::sys::BpfInsn;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Char,
    Block,
}

/// An allowed device: kind, major and minor (`None`: any), and the access granted, a subset
/// of "rwm" (read, write, mknod).
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: &'static str,
}

const fn rule(kind: Kind, major: Option<u32>, minor: Option<u32>, access: &'static str) -> Rule {
    Rule {
        kind,
        major,
        minor,
        access,
    }
}

/// Everything else is denied.
pub const ALLOWED: &[Rule] = &[
    rule(Kind::Char, None, None, "m"),
    rule(Kind::Block, None, None, "m"),
    rule(Kind::Char, Some(1), Some(3), "rwm"),    // null
    rule(Kind::Char, Some(1), Some(5), "rwm"),    // zero
    rule(Kind::Char, Some(1), Some(7), "rwm"),    // full
    rule(Kind::Char, Some(1), Some(8), "rwm"),    // random
    rule(Kind::Char, Some(1), Some(9), "rwm"),    // urandom
    rule(Kind::Char, Some(5), Some(0), "rwm"),    // tty
    rule(Kind::Char, Some(5), Some(2), "rwm"),    // ptmx
    rule(Kind::Char, Some(136), None, "rwm"),     // pts/*
    rule(Kind::Char, Some(10), Some(200), "rwm"), // net/tun
];

// struct bpf_cgroup_dev_ctx { u32 access_type /* access << 16 | type */; u32 major; u32 minor; }
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;

// opcodes
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const MOV64_K: u8 = 0xb7;
const MOV64_X: u8 = 0xbf;
const JNE_K: u8 = 0x55;
const EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    // `dst_reg:4, src_reg:4` bitfields: dst in the low nibble on little-endian machines
    let regs = if cfg!(target_endian = "little") {
        (src << 4) | (dst & 0x0f)
    } else {
        (dst << 4) | (src & 0x0f)
    };
    BpfInsn {
        code,
        regs,
        off,
        imm,
    }
}

fn access_bits(access: &str) -> i32 {
    access.chars().fold(0, |b, c| {
        b | match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => 0,
        }
    })
}

/// The device program for `rules`: returns 1 (allow) when some rule matches the device and
/// grants every access asked for, else 0.
pub fn program(rules: &[Rule]) -> Vec<BpfInsn> {
    // r2 = type, r3 = access, r4 = major, r5 = minor
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules {
        let kind = match r.kind {
            Kind::Char => DEV_CHAR,
            Kind::Block => DEV_BLOCK,
        };
        let mut checks = vec![(2u8, kind)];
        if let Some(m) = r.major {
            checks.push((4, m as i32));
        }
        if let Some(m) = r.minor {
            checks.push((5, m as i32));
        }
        // each check jumps past the rest of the block when it does not match
        let len = checks.len() + 5;
        for (i, (reg, v)) in checks.iter().enumerate() {
            p.push(insn(JNE_K, *reg, 0, (len - i - 1) as i16, *v));
        }
        p.push(insn(MOV64_X, 1, 3, 0, 0));
        p.push(insn(ALU32_AND_K, 1, 0, 0, !access_bits(r.access)));
        p.push(insn(JNE_K, 1, 0, 2, 0)); // asks for more than granted
        p.push(insn(MOV64_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Attach the device program for [`ALLOWED`] to the v2 cgroup directory `dir`.
pub fn restrict_v2(dir: &Path) -> std::io::Result<()> {
    let cg = std::fs::File::open(dir)?;
    let prog = crate::sys::bpf_load_device_program(&program(ALLOWED))?;
    use std::os::fd::AsFd;
    crate::sys::bpf_attach_device_program(cg.as_fd(), prog.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `p` as the kernel would for one device access (only the opcodes `program` emits).
    fn run(p: &[BpfInsn], kind: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [((access as u32) << 16) | kind as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0x0f) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads come from the context");
                    r[dst] = ctx[i.off as usize / 4] as u64;
                }
                ALU32_AND_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                ALU32_RSH_K => r[dst] = ((r[dst] as u32) >> i.imm) as u64,
                MOV64_K => r[dst] = i.imm as i64 as u64,
                MOV64_X => r[dst] = r[src],
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
            assert!(pc < p.len(), "ran off the end");
        }
    }

    #[test]
    fn the_program_allows_exactly_the_rules() {
        let p = program(ALLOWED);
        let rw = ACC_READ | ACC_WRITE;
        // docker's usable devices
        assert_eq!(run(&p, DEV_CHAR, rw, 1, 3), 1, "null");
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 9), 1, "urandom");
        assert_eq!(run(&p, DEV_CHAR, rw, 136, 7), 1, "any pts");
        assert_eq!(run(&p, DEV_CHAR, rw, 5, 2), 1, "ptmx");
        // any node may be made, not used
        assert_eq!(run(&p, DEV_BLOCK, ACC_MKNOD, 8, 0), 1);
        assert_eq!(run(&p, DEV_CHAR, ACC_MKNOD, 1, 1), 1);
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 8, 0), 0, "host disk");
        assert_eq!(
            run(&p, DEV_BLOCK, ACC_READ, 1, 3),
            0,
            "block 1:3 is not null"
        );
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 1), 0, "/dev/mem");
        assert_eq!(run(&p, DEV_CHAR, rw, 10, 229), 0, "fuse");
        assert_eq!(run(&p, DEV_CHAR, rw, 5, 1), 0, "the host's console");
        assert_eq!(run(&p, DEV_CHAR, ACC_READ | ACC_MKNOD, 4, 1), 0, "tty1");
        // a rule granting less than asked does not allow
        let only_read = [rule(Kind::Char, Some(1), Some(3), "r")];
        let p = program(&only_read);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 3), 1);
        assert_eq!(run(&p, DEV_CHAR, rw, 1, 3), 0);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 4), 0);
    }

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        let i = insn(LDX_MEM_W, 4, 1, 4, 0);
        assert_eq!((i.code, i.regs, i.off, i.imm), (0x61, 0x14, 4, 0));
        let p = program(&[]);
        assert_eq!(p.len(), 8, "prologue and deny");
        assert_eq!(p[p.len() - 1].code, EXIT);
    }
}
