//! A compact classic-BPF code generator for the seccomp allow-lists. Runs
//! on whichever thread first installs a kind's filter (see `program` in
//! the parent module); pure computation, no system calls.
//!
//! seccompiler spends five instructions on every syscall of a list and
//! tests them one after another, so an allow-list of 200 calls is a
//! program of 800 instructions. The kernel's cost of installing a filter
//! (checking, converting and JIT-compiling it) grows with its length:
//! measured on this project's lists, 0.15–0.6 ms per filter, about a
//! third of the VMM's whole start. This generator emits the same
//! decisions as a binary search on the syscall number that ends in short
//! runs of one-instruction tests, with the argument rules after it:
//! about 1.3 instructions per call, and a syscall is decided after about
//! ten instructions rather than a scan of the list.
//!
//! seccompiler stays the reference: unit tests run both programs, in a
//! BPF interpreter, over every syscall number and the argument values
//! the rules name, and require the same verdict (`tests::assert_same`),
//! for random lists and for every thread kind's list.
//! The filters are still installed with `seccompiler::apply_filter`.
//!
//! Semantics, as seccompiler's: a syscall without rules matches; one with
//! rules matches when any rule matches, a rule when all its conditions
//! hold. A 32-bit (`Dword`) condition compares the argument's low half
//! only. A foreign architecture kills the process.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};

// Classic BPF opcodes (linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const ALU_AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JMP_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const JMP_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JMP_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// `struct seccomp_data` offsets: syscall number, architecture, arguments.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARGS_OFFSET: u32 = 16;

/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// Return values (linux/seccomp.h).
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// Syscalls tested one after another at a leaf of the search; small
/// enough that every jump of a leaf fits a conditional jump's 8 bits.
const LEAF: usize = 16;

/// What a filter returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Trap,
    Errno(u32),
}

impl Action {
    fn ret(self) -> u32 {
        match self {
            Action::Allow => RET_ALLOW,
            Action::Trap => RET_TRAP,
            Action::Errno(e) => RET_ERRNO | (e & 0xffff),
        }
    }
}

/// How much of an argument a condition compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Width {
    /// The low 32 bits.
    Dword,
    /// All 64 bits.
    Qword,
}

/// One condition on a syscall argument: `(arg & mask) == value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cond {
    pub arg: u8,
    pub width: Width,
    /// `u64::MAX` for a plain equality.
    pub mask: u64,
    pub value: u64,
}

impl Cond {
    /// `arg == value`.
    pub fn eq(arg: u8, width: Width, value: u64) -> Cond {
        Cond {
            arg,
            width,
            mask: u64::MAX,
            value,
        }
    }

    /// `arg & mask == value & mask`.
    pub fn masked_eq(arg: u8, width: Width, mask: u64, value: u64) -> Cond {
        Cond {
            arg,
            width,
            mask,
            value: value & mask,
        }
    }
}

/// All conditions must hold.
pub(crate) type Rule = Vec<Cond>;

/// A filter: the syscalls it matches (each with its rules, any of which
/// must match; none: the syscall always matches), what it returns on a
/// match and otherwise.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub calls: BTreeMap<i64, Vec<Rule>>,
    pub on_match: Action,
    pub otherwise: Action,
}

/// A jump target, resolved when the program is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    /// The rule block of the syscall with this index in the sorted list.
    Rules(usize),
}

/// An instruction of the search, whose jump may still be a label.
enum Insn {
    Plain(sock_filter),
    /// `ja` to a label (32-bit offset, forward).
    JaTo(Label),
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

impl Spec {
    /// The program. Panics only on a spec with a syscall number outside
    /// 0..2^32 or an argument index above 5 (constants in this crate).
    pub fn compile(&self) -> BpfProgram {
        let calls: Vec<(u32, &Vec<Rule>)> = self
            .calls
            .iter()
            .map(|(&nr, rules)| (u32::try_from(nr).expect("syscall number"), rules))
            .collect();
        let mut code: Vec<Insn> = vec![
            Insn::Plain(stmt(LD_W_ABS, ARCH_OFFSET)),
            Insn::Plain(jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0)),
            Insn::Plain(stmt(RET_K, RET_KILL_PROCESS)),
            Insn::Plain(stmt(LD_W_ABS, NR_OFFSET)),
        ];
        let indexed: Vec<(usize, u32, bool)> = calls
            .iter()
            .enumerate()
            .map(|(i, (nr, rules))| (i, *nr, rules.is_empty()))
            .collect();
        let (on_match, otherwise) = (self.on_match.ret(), self.otherwise.ret());
        search(&indexed, &mut code, on_match, otherwise);
        // After the search, the rule blocks, each reached by a `ja` from
        // its leaf.
        let mut tail = Vec::new();
        let mut block_at = vec![usize::MAX; calls.len()];
        for (i, (_, rules)) in calls.iter().enumerate() {
            if !rules.is_empty() {
                block_at[i] = code.len() + tail.len();
                rule_block(rules, self.on_match, self.otherwise, &mut tail);
            }
        }
        let resolve = |l: Label| match l {
            Label::Rules(i) => block_at[i],
        };
        let mut out: BpfProgram = Vec::with_capacity(code.len() + tail.len());
        for (pc, insn) in code.into_iter().enumerate() {
            out.push(match insn {
                Insn::Plain(f) => f,
                Insn::JaTo(l) => stmt(JMP_JA, (resolve(l) - pc - 1) as u32),
            });
        }
        out.extend(tail);
        // The kernel's limit (BPF_MAXINSNS); this crate's lists are far
        // below it, which the unit tests check.
        assert!(
            out.len() <= 4096,
            "a seccomp filter of {} instructions",
            out.len()
        );
        out
    }
}

/// Emits the search over `calls` (sorted `(index, nr, unconditional)`),
/// with the syscall number in the accumulator. Every path ends in a jump
/// to a label.
fn search(calls: &[(usize, u32, bool)], code: &mut Vec<Insn>, on_match: u32, otherwise: u32) {
    if calls.len() <= LEAF {
        leaf(calls, code, on_match, otherwise);
        return;
    }
    // [jge mid: next, else skip 1] [ja RIGHT] [left...] [right...]
    let mid = calls.len() / 2;
    code.push(Insn::Plain(jump(JMP_JGE_K, calls[mid].1, 0, 1)));
    let ja_at = code.len();
    code.push(Insn::Plain(stmt(JMP_JA, 0))); // patched below
    search(&calls[..mid], code, on_match, otherwise);
    let right = code.len();
    code[ja_at] = Insn::Plain(stmt(JMP_JA, (right - ja_at - 1) as u32));
    search(&calls[mid..], code, on_match, otherwise);
}

/// A leaf: one `jeq nr` per syscall, then the leaf's own returns, then a
/// trampoline (`ja`, which reaches however far) to the rule block of
/// each syscall that has rules.
///
/// ```text
/// jeq n0 -> M ... jeq nk -> Tk; ret otherwise; M: ret on_match; Tk: ja Lk
/// ```
fn leaf(calls: &[(usize, u32, bool)], code: &mut Vec<Insn>, on_match: u32, otherwise: u32) {
    let n = calls.len();
    let mut trampolines = 0;
    for (j, &(_, nr, unconditional)) in calls.iter().enumerate() {
        // The tests after this one, then `ret otherwise`; then `M`, and
        // the trampolines of the earlier conditional syscalls.
        let to = (n - j - 1) + 1 + if unconditional { 0 } else { 1 + trampolines };
        if !unconditional {
            trampolines += 1;
        }
        let to = u8::try_from(to).expect("a leaf's jumps fit 8 bits");
        code.push(Insn::Plain(jump(JMP_JEQ_K, nr, to, 0)));
    }
    code.push(Insn::Plain(stmt(RET_K, otherwise)));
    code.push(Insn::Plain(stmt(RET_K, on_match)));
    for &(i, _, unconditional) in calls {
        if !unconditional {
            code.push(Insn::JaTo(Label::Rules(i)));
        }
    }
}

/// The rules of one syscall: each rule's conditions in turn; the first
/// failing one skips to the next rule; a rule that passes returns
/// `on_match`; after the last rule, `otherwise`.
fn rule_block(rules: &[Rule], on_match: Action, otherwise: Action, out: &mut Vec<sock_filter>) {
    if let Some(values) = one_of(rules) {
        // `arg` is one of the values: one load, one test per value.
        //   ld arg; jeq v0 -> M; ...; jeq vk -> M; ret otherwise; M: ret on_match
        let n = values.len();
        out.push(stmt(LD_W_ABS, ARGS_OFFSET + 8 * u32::from(rules[0][0].arg)));
        for (j, v) in values.iter().enumerate() {
            out.push(jump(JMP_JEQ_K, *v, (n - j) as u8, 0));
        }
        out.push(stmt(RET_K, otherwise.ret()));
        out.push(stmt(RET_K, on_match.ret()));
        return;
    }
    for rule in rules {
        let mut body: Vec<sock_filter> = Vec::new();
        // Each check is [ld, (and), jeq]; its jf is patched to the end of
        // the rule (the instruction after its `ret on_match`).
        let mut fails: Vec<usize> = Vec::new();
        for c in rule {
            assert!(c.arg <= 5, "seccomp argument index {}", c.arg);
            let lo = ARGS_OFFSET + 8 * u32::from(c.arg);
            // As seccompiler: the value is compared under the mask.
            let value = c.value & c.mask;
            let mut halves = vec![(lo, c.mask as u32, value as u32)];
            if c.width == Width::Qword {
                halves.push((lo + 4, (c.mask >> 32) as u32, (value >> 32) as u32));
            }
            for (at, mask, value) in halves {
                body.push(stmt(LD_W_ABS, at));
                if mask != u32::MAX {
                    body.push(stmt(ALU_AND_K, mask));
                }
                fails.push(body.len());
                body.push(jump(JMP_JEQ_K, value, 0, 0));
            }
        }
        body.push(stmt(RET_K, on_match.ret()));
        let end = body.len();
        for f in fails {
            let off = end - f - 1;
            body[f].jf = u8::try_from(off).expect("a rule of at most 60 compared halves");
        }
        out.extend(body);
    }
    out.push(stmt(RET_K, otherwise.ret()));
}

/// The values, when `rules` are up to 200 rules of one unmasked 32-bit
/// equality each on the same argument (an ioctl's request, a socket's
/// family): such a block is a set membership test.
fn one_of(rules: &[Rule]) -> Option<Vec<u32>> {
    let arg = rules.first()?.first()?.arg;
    assert!(arg <= 5, "seccomp argument index {arg}");
    if rules.len() > 200 {
        return None;
    }
    rules
        .iter()
        .map(|r| match r.as_slice() {
            [c] if c.arg == arg && c.width == Width::Dword && c.mask == u64::MAX => {
                Some(c.value as u32)
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod interp {
    //! A classic-BPF interpreter for the instructions both generators
    //! emit, over a `struct seccomp_data`.
    use super::*;

    /// The filter's return value for syscall `nr` of architecture `arch`
    /// with arguments `args`. Panics on an instruction it does not know,
    /// a jump out of the program or falling off its end.
    pub fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let f = &prog[pc];
            pc += 1;
            match f.code {
                LD_W_ABS => {
                    let at = f.k as usize;
                    acc = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                }
                ALU_AND_K => acc &= f.k,
                JMP_JA => pc += f.k as usize,
                JMP_JEQ_K => pc += usize::from(if acc == f.k { f.jt } else { f.jf }),
                JMP_JGE_K => pc += usize::from(if acc >= f.k { f.jt } else { f.jf }),
                // BPF_JMP | BPF_JGT | BPF_K
                0x25 => pc += usize::from(if acc > f.k { f.jt } else { f.jf }),
                RET_K => return f.k,
                other => panic!("unknown BPF instruction {other:#x} at {}", pc - 1),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::interp::run;
    use super::*;
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    /// seccompiler's program for `spec`: the reference.
    fn reference(spec: &Spec) -> BpfProgram {
        let action = |a: Action| match a {
            Action::Allow => SeccompAction::Allow,
            Action::Trap => SeccompAction::Trap,
            Action::Errno(e) => SeccompAction::Errno(e),
        };
        let rules = spec
            .calls
            .iter()
            .map(|(&nr, rules)| {
                let rules = rules
                    .iter()
                    .map(|r| {
                        let conds = r
                            .iter()
                            .map(|c| {
                                let len = match c.width {
                                    Width::Dword => SeccompCmpArgLen::Dword,
                                    Width::Qword => SeccompCmpArgLen::Qword,
                                };
                                let op = if c.mask == u64::MAX {
                                    SeccompCmpOp::Eq
                                } else {
                                    SeccompCmpOp::MaskedEq(c.mask)
                                };
                                SeccompCondition::new(c.arg, len, op, c.value).unwrap()
                            })
                            .collect();
                        SeccompRule::new(conds).unwrap()
                    })
                    .collect();
                (nr, rules)
            })
            .collect();
        SeccompFilter::new(
            rules,
            action(spec.otherwise),
            action(spec.on_match),
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap()
    }

    /// Argument vectors worth trying for `rules`: each condition's value
    /// (alone and with the others'), its neighbours, high bits flipped.
    fn probes(rules: &[Rule], seed: &mut u64) -> Vec<[u64; 6]> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let mut v = vec![[0; 6], [u64::MAX; 6]];
        for rule in rules {
            let mut all = [0u64; 6];
            for c in rule {
                all[c.arg as usize] = c.value;
            }
            v.push(all);
            for c in rule {
                for x in [
                    c.value,
                    c.value ^ 1,
                    c.value ^ (1 << 40),
                    c.value | !c.mask,
                    c.value.wrapping_add(1),
                    next(),
                ] {
                    let mut a = all;
                    a[c.arg as usize] = x;
                    v.push(a);
                    let mut b = [0u64; 6];
                    b[c.arg as usize] = x;
                    v.push(b);
                }
            }
        }
        v
    }

    /// Both programs give the same verdict for every syscall number (and
    /// numbers around and beyond), both architectures, and the probes.
    pub(crate) fn assert_same(spec: &Spec, seed: u64) {
        let ours = spec.compile();
        let theirs = reference(spec);
        let mut seed = seed | 1;
        let mut numbers: Vec<u32> = (0..600).collect();
        numbers.extend([0x4000_0000, 0x4000_0001, u32::MAX, u32::MAX - 1]);
        for &nr in &numbers {
            let rules = spec.calls.get(&i64::from(nr));
            let args = rules.map_or_else(|| vec![[0; 6], [7; 6]], |r| probes(r, &mut seed));
            for a in args {
                for arch in [AUDIT_ARCH_X86_64, 0x4000_0028] {
                    assert_eq!(
                        run(&ours, arch, nr, a),
                        run(&theirs, arch, nr, a),
                        "syscall {nr}, arch {arch:#x}, args {a:x?}"
                    );
                }
            }
        }
    }

    fn spec(calls: BTreeMap<i64, Vec<Rule>>) -> Spec {
        Spec {
            calls,
            on_match: Action::Allow,
            otherwise: Action::Trap,
        }
    }

    #[test]
    fn empty_and_tiny_lists() {
        assert_same(&spec(BTreeMap::new()), 1);
        assert_same(&spec(BTreeMap::from([(0, vec![])])), 2);
        assert_same(&spec(BTreeMap::from([(59, vec![])])), 3);
        let enosys = Spec {
            calls: BTreeMap::from([(435, vec![])]),
            on_match: Action::Errno(38),
            otherwise: Action::Allow,
        };
        assert_same(&enosys, 4);
    }

    #[test]
    fn rules_of_every_shape() {
        let calls = BTreeMap::from([
            (1, vec![]),
            (
                16,
                vec![
                    vec![Cond::eq(1, Width::Dword, 0xae80)],
                    vec![Cond::eq(1, Width::Dword, 0x8090_ae81)],
                ],
            ),
            (
                56,
                vec![
                    vec![Cond::eq(0, Width::Qword, 0x4100)],
                    vec![Cond::masked_eq(0, Width::Qword, 0x10000, 0x10000)],
                ],
            ),
            (
                302,
                vec![vec![
                    Cond::eq(0, Width::Qword, 0),
                    Cond::eq(2, Width::Qword, 0),
                ]],
            ),
            (
                41,
                vec![vec![Cond::masked_eq(0, Width::Dword, 0xff, 0x1234_5601)]],
            ),
            (
                9,
                vec![vec![Cond::eq(5, Width::Qword, 0xdead_beef_0000_0001)]],
            ),
        ]);
        assert_same(&spec(calls), 5);
    }

    /// Random lists, long and short, with random rules.
    #[test]
    fn random_lists_match_seccompiler() {
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..40 {
            let n = (next() % 300) as usize;
            let mut calls = BTreeMap::new();
            for _ in 0..n {
                let nr = (next() % 460) as i64;
                let rules = if next() % 5 == 0 {
                    (0..1 + next() % 3)
                        .map(|_| {
                            (0..1 + next() % 3)
                                .map(|_| {
                                    let arg = (next() % 6) as u8;
                                    let width = if next() % 2 == 0 {
                                        Width::Dword
                                    } else {
                                        Width::Qword
                                    };
                                    let value = next() >> (next() % 64);
                                    if next() % 3 == 0 {
                                        Cond::masked_eq(arg, width, next(), value)
                                    } else {
                                        Cond::eq(arg, width, value)
                                    }
                                })
                                .collect()
                        })
                        .collect()
                } else {
                    vec![]
                };
                calls.insert(nr, rules);
            }
            assert_same(&spec(calls), round);
        }
    }
}
