//! A tiny x86-64 machine-code emitter for micro-guests.
//!
//! Just the handful of instructions the self-test and the backend's
//! tests need, encoded by hand; labels are resolved at `finish()`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    Rax = 0,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

/// Condition codes for `jcc` (low nibble of 0F 8x).
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum Cond {
    E = 0x4,
    Ne = 0x5,
    B = 0x2,
    Ae = 0x3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

pub struct Asm {
    base: u64,
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    /// Code that will be loaded at guest-physical (= virtual) `base`.
    pub fn new(base: u64) -> Self {
        Self { base, code: Vec::new(), labels: Vec::new(), fixups: Vec::new() }
    }

    /// Guest address of the next byte.
    pub fn here(&self) -> u64 {
        self.base + self.code.len() as u64
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) -> &mut Self {
        self.labels[l.0] = Some(self.code.len());
        self
    }

    /// Guest address of a bound label.
    pub fn addr_of(&self, l: Label) -> u64 {
        self.base + self.labels[l.0].expect("label not bound") as u64
    }

    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }

    pub fn jmp(&mut self, l: Label) -> &mut Self {
        self.code.push(0xe9);
        self.rel32(l);
        self
    }

    pub fn jcc(&mut self, c: Cond, l: Label) -> &mut Self {
        self.code.extend_from_slice(&[0x0f, 0x80 | c as u8]);
        self.rel32(l);
        self
    }

    fn rex(&mut self, w: bool, reg: u8, rm: u8) {
        let r = 0x40 | (u8::from(w) << 3) | ((reg >> 3) << 2) | (rm >> 3);
        if r != 0x40 {
            self.code.push(r);
        }
    }

    /// ModRM (+SIB) for `[base + disp32]`.
    fn mem(&mut self, reg: u8, base: Reg, disp: i32) {
        let b = base as u8 & 7;
        self.code.push(0x80 | ((reg & 7) << 3) | b);
        if b == 4 {
            self.code.push(0x24);
        }
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    pub fn mov32(&mut self, r: Reg, imm: u32) -> &mut Self {
        self.rex(false, 0, r as u8);
        self.code.push(0xb8 + (r as u8 & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }

    pub fn mov64(&mut self, r: Reg, imm: u64) -> &mut Self {
        self.rex(true, 0, r as u8);
        self.code.push(0xb8 + (r as u8 & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }

    /// `mov dst, src` (64-bit).
    pub fn mov_rr(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.rex(true, src as u8, dst as u8);
        self.code.extend_from_slice(&[0x89, 0xc0 | ((src as u8 & 7) << 3) | (dst as u8 & 7)]);
        self
    }

    /// `mov dword [base+disp], imm32`.
    pub fn store32(&mut self, base: Reg, disp: i32, imm: u32) -> &mut Self {
        self.rex(false, 0, base as u8);
        self.code.push(0xc7);
        self.mem(0, base, disp);
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }

    /// `mov [base+disp], src` (64-bit).
    pub fn store64(&mut self, base: Reg, disp: i32, src: Reg) -> &mut Self {
        self.rex(true, src as u8, base as u8);
        self.code.push(0x89);
        self.mem(src as u8, base, disp);
        self
    }

    /// `mov dst, [base+disp]` (64-bit).
    pub fn load64(&mut self, dst: Reg, base: Reg, disp: i32) -> &mut Self {
        self.rex(true, dst as u8, base as u8);
        self.code.push(0x8b);
        self.mem(dst as u8, base, disp);
        self
    }

    /// `mov dst, [base+disp]` (32-bit, zero-extends).
    pub fn load32(&mut self, dst: Reg, base: Reg, disp: i32) -> &mut Self {
        self.rex(false, dst as u8, base as u8);
        self.code.push(0x8b);
        self.mem(dst as u8, base, disp);
        self
    }

    /// `cmp r32, imm32`.
    pub fn cmp32(&mut self, r: Reg, imm: u32) -> &mut Self {
        self.rex(false, 0, r as u8);
        self.code.extend_from_slice(&[0x81, 0xf8 | (r as u8 & 7)]);
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }

    /// `cmp a, b` (64-bit).
    pub fn cmp_rr(&mut self, a: Reg, b: Reg) -> &mut Self {
        self.rex(true, b as u8, a as u8);
        self.code.extend_from_slice(&[0x39, 0xc0 | ((b as u8 & 7) << 3) | (a as u8 & 7)]);
        self
    }

    /// `dec r32`.
    pub fn dec32(&mut self, r: Reg) -> &mut Self {
        self.rex(false, 0, r as u8);
        self.code.extend_from_slice(&[0xff, 0xc8 | (r as u8 & 7)]);
        self
    }

    /// `shr r64, imm8`.
    pub fn shr64(&mut self, r: Reg, n: u8) -> &mut Self {
        self.rex(true, 0, r as u8);
        self.code.extend_from_slice(&[0xc1, 0xe8 | (r as u8 & 7), n]);
        self
    }

    /// `out dx, al` with `port` and `val` loaded first (clobbers rax, rdx).
    pub fn outb(&mut self, port: u16, val: u8) -> &mut Self {
        self.mov32(Reg::Rdx, port.into()).mov32(Reg::Rax, val.into());
        self.code.push(0xee);
        self
    }

    /// `out dx, ax` (clobbers rax, rdx).
    pub fn outw(&mut self, port: u16, val: u16) -> &mut Self {
        self.mov32(Reg::Rdx, port.into()).mov32(Reg::Rax, val.into());
        self.code.extend_from_slice(&[0x66, 0xef]);
        self
    }

    /// `out dx, eax` of whatever is in eax (clobbers rdx).
    pub fn out_eax(&mut self, port: u16) -> &mut Self {
        self.mov32(Reg::Rdx, port.into());
        self.code.push(0xef);
        self
    }

    /// `in eax, dx` (clobbers rdx).
    pub fn in_eax(&mut self, port: u16) -> &mut Self {
        self.mov32(Reg::Rdx, port.into());
        self.code.push(0xed);
        self
    }

    /// Writes `s` byte by byte to an 8250 data register.
    pub fn puts(&mut self, port: u16, s: &str) -> &mut Self {
        self.mov32(Reg::Rdx, port.into());
        for b in s.bytes() {
            self.code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
        }
        self
    }

    /// `opcode` with a `[base+disp32]` operand and `reg` in ModRM.reg
    /// (a register number or an opcode extension).
    pub fn op_mem(&mut self, opcode: &[u8], reg: u8, base: Reg, disp: i32) -> &mut Self {
        self.rex(false, reg, base as u8);
        self.code.extend_from_slice(opcode);
        self.mem(reg, base, disp);
        self
    }

    /// `out dx, eax` of a constant (clobbers rax, rdx).
    pub fn outl(&mut self, port: u16, val: u32) -> &mut Self {
        self.mov32(Reg::Rax, val).out_eax(port)
    }

    pub fn cpuid(&mut self) -> &mut Self {
        self.bytes(&[0x0f, 0xa2])
    }

    pub fn rdmsr(&mut self) -> &mut Self {
        self.bytes(&[0x0f, 0x32])
    }

    /// `mov rax, crN` for N in {0, 3, 4}.
    pub fn read_cr(&mut self, n: u8) -> &mut Self {
        self.bytes(&[0x0f, 0x20, 0xc0 | (n << 3)])
    }

    /// Software-enables the xAPIC at `lapic` and broadcasts INIT then two
    /// SIPIs to every other CPU, starting them at the page `trampoline`.
    pub fn wake_all_aps(&mut self, lapic: u64, trampoline: u64) -> &mut Self {
        let sipi = 0x000c_4600 | (trampoline >> 12) as u32;
        self.mov64(Reg::Rdi, lapic)
            .store32(Reg::Rdi, 0xf0, 0x1ff) // SVR: APIC software-enabled
            .store32(Reg::Rdi, 0x310, 0)
            .store32(Reg::Rdi, 0x300, 0x000c_4500) // INIT, all excluding self
            .store32(Reg::Rdi, 0x300, sipi)
            .store32(Reg::Rdi, 0x300, sipi)
    }

    /// `cli; hlt` forever.
    pub fn halt_forever(&mut self) -> &mut Self {
        let l = self.label();
        self.bind(l).bytes(&[0xfa, 0xf4]).jmp(l)
    }

    /// Resolves labels and returns the code.
    pub fn finish(mut self) -> Vec<u8> {
        for (at, l) in std::mem::take(&mut self.fixups) {
            let target = self.labels[l.0].expect("jump to an unbound label") as i64;
            let rel = (target - (at as i64 + 4)) as i32;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut a = Asm::new(0x1000);
        a.mov32(Reg::Rax, 1).mov64(Reg::Rdi, 0xfee0_0000).store32(Reg::Rdi, 0x300, 0xc4500);
        a.mov32(Reg::R9, 7).load64(Reg::Rax, Reg::R12, 8).cmp32(Reg::Rcx, 32).dec32(Reg::Rcx);
        let l = a.label();
        a.bind(l).jcc(Cond::Ne, l);
        assert_eq!(
            a.finish(),
            [
                0xb8, 1, 0, 0, 0, // mov eax, 1
                0x48, 0xbf, 0, 0, 0xe0, 0xfe, 0, 0, 0, 0, // mov rdi, imm64
                0xc7, 0x87, 0, 3, 0, 0, 0, 0x45, 0x0c, 0, // mov dword [rdi+0x300], imm
                0x41, 0xb9, 7, 0, 0, 0, // mov r9d, 7
                0x49, 0x8b, 0x84, 0x24, 8, 0, 0, 0, // mov rax, [r12+8]
                0x81, 0xf9, 32, 0, 0, 0, // cmp ecx, 32
                0xff, 0xc9, // dec ecx
                0x0f, 0x85, 0xfa, 0xff, 0xff, 0xff, // jne self
            ]
        );
    }
}
