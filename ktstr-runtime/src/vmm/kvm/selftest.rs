//! KVM self-test: can this host's KVM run a Linux kernel?
//!
//! About 1 KiB of 64-bit guest code (most of it exception stubs) runs, with interrupts off, the
//! instructions an early kernel needs (VEX, XSAVE/XRSTOR, INT3 through an
//! IDT, POPCNT, CMPXCHG16B, LDMXCSR, LZCNT/TZCNT), check their results,
//! and time a loop at CPL0. Hosts that emulate CPL0 code (kvm_pvm, some
//! nested setups) fail with emulation errors or are far too slow. The
//! verdict is cached per host boot.

use std::path::PathBuf;
use std::time::Duration;

use kvm_bindings::{kvm_xcrs, KVM_MAX_CPUID_ENTRIES};
use vm_memory::{Bytes, GuestAddress};

use super::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use super::asm::{Asm, Cond, Label, Reg};
use super::devices::TEST_PORT;
use super::exits::Cause;
use super::machine::Machine;
use super::memory::RAW_CODE;
use super::paging::CR4_OSXSAVE;
use crate::vmm::{Topology, VmError};

/// Bump when the guest program or the criteria change: old cached
/// verdicts then stop applying.
const VERSION: u32 = 3;

#[derive(Debug, Clone)]
pub struct Verdict {
    pub ok: bool,
    pub detail: String,
}

impl Verdict {
    pub fn usable(&self) -> bool {
        self.ok
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

// Guest → host markers on TEST_PORT.
const M_START: u32 = 0x100;
const M_PASS: u32 = 0x200;
const M_WRONG: u32 = 0x300;
const M_EXCEPTION: u32 = 0x400;
const M_TIME_START: u32 = 0x500;
const M_TIME_END: u32 = 0x501;
const M_DONE: u32 = 0x600;

const IDT: u64 = 0x3000;
const XSAVE_AREA: u64 = 0x4000;
const CX16_AREA: u64 = 0x5000;
const MXCSR_AREA: u64 = 0x5100;
const LOOP_ITERS: u32 = 20_000;
const LOOP_ROUNDS: usize = 3;
/// Below this a kernel's boot takes many minutes: "far too slow".
const MIN_INSTR_PER_SEC: f64 = 5e6;

/// The instruction checks, in order; `check` leaves ZF set on success.
const STEPS: &[&str] = &["VEX (SHLX)", "XSAVE/XRSTOR", "INT3", "POPCNT", "CMPXCHG16B", "LDMXCSR", "LZCNT", "TZCNT"];

fn emit_check(a: &mut Asm, step: usize, int3_hit: u32) {
    match step {
        0 => {
            a.mov32(Reg::Rax, 1).mov32(Reg::Rcx, 5);
            a.bytes(&[0xc4, 0xe2, 0x71, 0xf7, 0xd0]); // shlx edx, eax, ecx
            a.cmp32(Reg::Rdx, 32);
        }
        1 => {
            a.mov64(Reg::Rdi, XSAVE_AREA).mov32(Reg::Rax, 3).mov32(Reg::Rdx, 0);
            a.bytes(&[0x0f, 0xae, 0x27]); // xsave [rdi]
            a.bytes(&[0x0f, 0xae, 0x2f]); // xrstor [rdi]
            a.cmp32(Reg::Rax, 3);
        }
        2 => {
            a.mov32(Reg::Rbx, 0).bytes(&[0xcc]); // int3 → handler sets ebx
            a.cmp32(Reg::Rbx, int3_hit);
        }
        3 => {
            a.mov32(Reg::Rax, 0xf0f0_f0f0);
            a.bytes(&[0xf3, 0x0f, 0xb8, 0xc8]); // popcnt ecx, eax
            a.cmp32(Reg::Rcx, 16);
        }
        4 => {
            a.mov64(Reg::Rdi, CX16_AREA).mov64(Reg::Rax, 0x1111).mov64(Reg::Rdx, 0x2222);
            a.mov64(Reg::Rbx, 0x3333).mov64(Reg::Rcx, 0x4444);
            a.bytes(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]); // lock cmpxchg16b [rdi]
            a.load32(Reg::Rax, Reg::Rdi, 8).cmp32(Reg::Rax, 0x4444);
        }
        5 => {
            a.mov64(Reg::Rdi, MXCSR_AREA).store32(Reg::Rdi, 0, 0x7f80);
            a.op_mem(&[0x0f, 0xae], 2, Reg::Rdi, 0); // ldmxcsr [rdi]
            a.op_mem(&[0x0f, 0xae], 3, Reg::Rdi, 4); // stmxcsr [rdi+4]
            a.load32(Reg::Rax, Reg::Rdi, 4).cmp32(Reg::Rax, 0x7f80);
        }
        6 => {
            a.mov32(Reg::Rax, 1);
            a.bytes(&[0xf3, 0x0f, 0xbd, 0xc8]); // lzcnt ecx, eax (BSR would give 0)
            a.cmp32(Reg::Rcx, 31);
        }
        7 => {
            a.mov32(Reg::Rax, 0).mov32(Reg::Rcx, 0x55);
            a.bytes(&[0xf3, 0x0f, 0xbc, 0xc8]); // tzcnt ecx, eax (BSF leaves ecx)
            a.cmp32(Reg::Rcx, 32);
        }
        _ => unreachable!(),
    }
}

struct Program {
    code: Vec<u8>,
    /// Entry address of each step; `STEPS.len()` is the timing loop.
    entries: Vec<u64>,
    idt: Vec<u8>,
}

fn gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&super::gdt::CODE64_SEL.to_le_bytes());
    g[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

fn program() -> Program {
    const INT3_HIT: u32 = 0x1234;
    let mut a = Asm::new(RAW_CODE);
    let mut entries = Vec::new();
    let labels: Vec<Label> = (0..=STEPS.len()).map(|_| a.label()).collect();
    for (i, _) in STEPS.iter().enumerate() {
        a.bind(labels[i]);
        entries.push(0);
        a.outl(TEST_PORT, M_START | i as u32);
        emit_check(&mut a, i, INT3_HIT);
        let wrong = a.label();
        a.jcc(Cond::Ne, wrong).outl(TEST_PORT, M_PASS | i as u32).jmp(labels[i + 1]);
        a.bind(wrong).outl(TEST_PORT, M_WRONG | i as u32).jmp(labels[i + 1]);
    }
    // Timing: a dec/jnz loop, bracketed by port writes the host timestamps.
    a.bind(labels[STEPS.len()]);
    entries.push(0);
    for _ in 0..LOOP_ROUNDS {
        a.outl(TEST_PORT, M_TIME_START).mov32(Reg::Rcx, LOOP_ITERS);
        let top = a.label();
        a.bind(top).dec32(Reg::Rcx).jcc(Cond::Ne, top);
        a.outl(TEST_PORT, M_TIME_END);
    }
    a.outl(TEST_PORT, M_DONE);
    let off = a.label();
    a.bind(off).outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();

    // int3 handler, and one stub per other exception reporting its vector.
    let int3 = a.label();
    a.bind(int3).mov32(Reg::Rbx, INT3_HIT).bytes(&[0x48, 0xcf]); // iretq
    let report = a.label();
    let stubs: Vec<Label> = (0..32).map(|_| a.label()).collect();
    for (v, l) in stubs.iter().enumerate() {
        a.bind(*l).bytes(&[0xb0, v as u8]).jmp(report); // mov al, vector
    }
    a.bind(report).bytes(&[0x0f, 0xb6, 0xc0]); // movzx eax, al
    a.bytes(&[0x0d]).bytes(&M_EXCEPTION.to_le_bytes()); // or eax, M_EXCEPTION
    a.out_eax(TEST_PORT).jmp(off);

    for (i, l) in labels.iter().enumerate() {
        entries[i] = a.addr_of(*l);
    }
    let mut idt = Vec::with_capacity(32 * 16);
    for (v, l) in stubs.iter().enumerate() {
        let h = if v == 3 { a.addr_of(int3) } else { a.addr_of(*l) };
        idt.extend_from_slice(&gate(h));
    }
    Program { code: a.finish(), entries, idt }
}

#[derive(Debug, Clone, PartialEq)]
enum StepResult {
    Pass,
    Wrong,
    Failed(String),
}

/// One VM from `entry`: what each step did, the loop times, whether the
/// program finished.
struct RunReport {
    results: Vec<(usize, StepResult)>,
    loop_times: Vec<Duration>,
    done: bool,
    /// The step that was running when the VM stopped early.
    stuck_in: Option<usize>,
}

fn run_from(prog: &Program, entry: u64) -> Result<RunReport, VmError> {
    let mut m = Machine::new(Topology::cpus(1), 64)?;
    let mem = m.memory();
    let io = |e: vm_memory::GuestMemoryError| VmError::Host(anyhow::anyhow!("self-test guest memory: {e}"));
    mem.write_slice(&prog.idt, GuestAddress(IDT)).map_err(io)?;
    mem.write_obj(0x1111u64, GuestAddress(CX16_AREA)).map_err(io)?;
    mem.write_obj(0x2222u64, GuestAddress(CX16_AREA + 8)).map_err(io)?;
    m.load_raw_at(&prog.code, RAW_CODE, entry)?;
    prepare_bsp(&m)?;
    let out = m.run(Duration::from_secs(10))?;

    let mut rep = RunReport { results: Vec::new(), loop_times: Vec::new(), done: false, stuck_in: None };
    let mut current = None;
    let mut t0 = None;
    for w in &out.port_writes {
        let (kind, arg) = (w.value & !0xff, (w.value & 0xff) as usize);
        match kind {
            M_START => current = Some(arg),
            M_PASS => {
                rep.results.push((arg, StepResult::Pass));
                current = None;
            }
            M_WRONG => {
                rep.results.push((arg, StepResult::Wrong));
                current = None;
            }
            M_EXCEPTION => {
                if let Some(c) = current.take() {
                    rep.results.push((c, StepResult::Failed(format!("exception #{arg}"))));
                    rep.stuck_in = Some(c);
                }
            }
            _ if w.value == M_TIME_START => {
                current = Some(STEPS.len());
                t0 = Some(w.at);
            }
            _ if w.value == M_TIME_END => {
                if let Some(t) = t0.take() {
                    rep.loop_times.push(w.at - t);
                }
            }
            _ if w.value == M_DONE => rep.done = true,
            _ => {}
        }
    }
    if !rep.done && rep.stuck_in.is_none() {
        if let Some(c) = current {
            let why = match &out.cause {
                Cause::Emulation(e) => {
                    let b: Vec<String> = e.insn.iter().take(6).map(|b| format!("{b:02x}")).collect();
                    format!("emulation failure [{}]", b.join(" "))
                }
                Cause::TripleFault { .. } => "triple fault".into(),
                Cause::Timeout => "hung".into(),
                other => format!("{other:?}"),
            };
            if c < STEPS.len() {
                rep.results.push((c, StepResult::Failed(why)));
            }
            rep.stuck_in = Some(c);
        }
    }
    Ok(rep)
}

/// CR4.OSXSAVE and XCR0 for the XSAVE step, the test IDT.
fn prepare_bsp(m: &Machine) -> Result<(), VmError> {
    let vcpu = m.bsp();
    let err = |what: &str, e: kvm_ioctls::Error| VmError::from_kvm_errno(what, e.errno());
    let mut sregs = vcpu.get_sregs().map_err(|e| err("KVM_GET_SREGS", e))?;
    sregs.idt.base = IDT;
    sregs.idt.limit = 32 * 16 - 1;
    let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(|e| err("KVM_GET_CPUID2", e))?;
    let has_xsave = cpuid.as_slice().iter().any(|e| e.function == 1 && e.ecx & (1 << 26) != 0);
    if has_xsave {
        sregs.cr4 |= CR4_OSXSAVE;
    }
    vcpu.set_sregs(&sregs).map_err(|e| err("KVM_SET_SREGS", e))?;
    if has_xsave {
        let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 3; // x87 | SSE
        vcpu.set_xcrs(&xcrs).map_err(|e| err("KVM_SET_XCRS", e))?;
    }
    Ok(())
}

/// Runs the self-test now (no cache). Errors mean KVM itself could not be
/// used (missing device, host pressure), not that it failed the test.
pub fn measure() -> Result<Verdict, VmError> {
    let prog = program();
    let mut results: Vec<Option<StepResult>> = vec![None; STEPS.len()];
    let mut loop_times = Vec::new();
    let mut next = 0;
    // Restart after each step that stops the VM; at most one VM per step.
    while next <= STEPS.len() {
        let rep = run_from(&prog, prog.entries[next])?;
        for (i, r) in rep.results {
            results[i].get_or_insert(r);
        }
        loop_times.extend(rep.loop_times);
        if rep.done {
            break;
        }
        next = match rep.stuck_in {
            Some(s) => s + 1,
            None => STEPS.len() + 1,
        };
    }
    Ok(judge(&results, &loop_times))
}

fn judge(results: &[Option<StepResult>], loop_times: &[Duration]) -> Verdict {
    let mut failed = Vec::new();
    let mut wrong = Vec::new();
    for (name, r) in STEPS.iter().zip(results) {
        match r {
            Some(StepResult::Pass) => {}
            Some(StepResult::Wrong) => wrong.push(name.to_string()),
            Some(StepResult::Failed(why)) => failed.push(format!("{name}: {why}")),
            None => failed.push(format!("{name}: did not run")),
        }
    }
    let rate = loop_times.iter().min().map(|t| 2.0 * LOOP_ITERS as f64 / t.as_secs_f64().max(1e-9));
    let too_slow = rate.is_none_or(|r| r < MIN_INSTR_PER_SEC);
    let speed = match rate {
        Some(r) => format!("CPL0 loop at {:.1}M instr/s", r / 1e6),
        None => "CPL0 loop did not complete".into(),
    };
    let ok = failed.is_empty() && wrong.is_empty() && !too_slow;
    let detail = if ok {
        format!("usable: {} all ran correctly; {speed}", STEPS.join(", "))
    } else {
        let mut parts = Vec::new();
        if !failed.is_empty() {
            parts.push(format!("failed {}", failed.join("; ")));
        }
        if !wrong.is_empty() {
            parts.push(format!("wrong results from {} (run as older instructions)", wrong.join(", ")));
        }
        if too_slow {
            parts.push(format!("{speed}, far too slow (need {:.0}M)", MIN_INSTR_PER_SEC / 1e6));
        } else {
            parts.push(speed);
        }
        format!("unusable: {}", parts.join("; "))
    };
    Verdict { ok, detail }
}

fn cache_path() -> PathBuf {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let name = format!("ktstr-kvm-selftest-{}", boot_id.trim());
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|d| d.is_dir()) {
        Some(dir) => dir.join(name),
        None => std::env::temp_dir().join(name),
    }
}

fn read_cache(path: &std::path::Path) -> Option<Verdict> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    if v.get("version")?.as_u64()? != u64::from(VERSION) {
        return None;
    }
    Some(Verdict { ok: v.get("ok")?.as_bool()?, detail: v.get("detail")?.as_str()?.to_string() })
}

fn write_cache(path: &std::path::Path, v: &Verdict) {
    let body = serde_json::json!({ "version": VERSION, "ok": v.ok, "detail": v.detail });
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, body.to_string()).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// An exclusive flock on `{cache}.lock`, released on drop; best effort
/// (without it, concurrent processes each measure, which is only slower).
struct CacheLock(Option<std::fs::File>);

impl CacheLock {
    fn take(cache: &std::path::Path) -> Self {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(cache.with_extension("lock")).ok();
        if let Some(f) = &f {
            // SAFETY: flock on a file we own; blocks until granted.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
        CacheLock(f)
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        if let Some(f) = &self.0 {
            // SAFETY: unlocking the lock taken in `take`.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// The self-test verdict for this host boot: from the cache file when
/// there is one, else measured (and cached).
pub fn verdict() -> Result<Verdict, VmError> {
    static MEMO: std::sync::Mutex<Option<Verdict>> = std::sync::Mutex::new(None);
    let mut memo = MEMO.lock().unwrap();
    if let Some(v) = memo.as_ref() {
        return Ok(v.clone());
    }
    let path = cache_path();
    let v = match read_cache(&path) {
        Some(v) => v,
        None => {
            // nextest starts many test processes at once: one measures,
            // the others wait on the lock and read its verdict.
            let _lock = CacheLock::take(&path);
            match read_cache(&path) {
                Some(v) => v,
                None => {
                    let v = measure()?;
                    write_cache(&path, &v);
                    v
                }
            }
        }
    };
    *memo = Some(v.clone());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_texts() {
        let all_pass = vec![Some(StepResult::Pass); STEPS.len()];
        let v = judge(&all_pass, &[Duration::from_micros(100)]);
        assert!(v.usable(), "{v}");
        assert!(v.to_string().starts_with("usable:"));
        let v = judge(&all_pass, &[Duration::from_millis(40)]);
        assert!(!v.usable());
        assert!(v.to_string().contains("far too slow"), "{v}");
        let mut some = all_pass.clone();
        some[0] = Some(StepResult::Failed("emulation failure [c4 e2]".into()));
        some[6] = Some(StepResult::Wrong);
        let v = judge(&some, &[Duration::from_micros(100)]);
        assert!(!v.usable());
        assert!(v.to_string().contains("VEX (SHLX): emulation failure"), "{v}");
        assert!(v.to_string().contains("wrong results from LZCNT"), "{v}");
    }

    #[test]
    fn program_layout() {
        let p = program();
        assert_eq!(p.entries.len(), STEPS.len() + 1);
        assert!(p.entries.windows(2).all(|w| w[0] < w[1]));
        // ~700 bytes of checks plus 32 exception stubs.
        assert!(p.code.len() < 1100, "about a kilobyte, not {}", p.code.len());
        assert_eq!(p.idt.len(), 32 * 16);
    }

    #[test]
    fn cache_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        assert!(read_cache(&path).is_none());
        let v = Verdict { ok: false, detail: "unusable: x".into() };
        write_cache(&path, &v);
        let r = read_cache(&path).unwrap();
        assert_eq!((r.ok, r.detail.as_str()), (false, "unusable: x"));
    }
}
