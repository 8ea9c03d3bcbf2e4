//! Finds RET instructions by decoding a function's machine code, so that
//! return-side probes never need uretprobes (which break moving Go stacks).
use std::collections::BTreeMap;

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    Register,
};

/// Go's stack-bound check at a function's start:
/// `CMPQ SP, 16(R14)` (or `LEAQ -N(SP), R12; CMPQ R12, 16(R14)`) then `JLS`.
/// `//go:systemstack` functions compare against `g.stackguard1` (+24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackCheck {
    /// Address of the CMP.
    pub cmp: u64,
    /// Address of the conditional jump after it (to `morestack`); the
    /// argument registers are unchanged up to and including it.
    pub jump: u64,
}

/// Finds the stack check in the first instructions of a Go function
/// (`g.stackguard0`/`stackguard1` are at 16/24 in the goroutine in R14). `None` for
/// functions without one (NOSPLIT) or for code that is not a Go function.
pub fn stack_check(code: &[u8], address: u64) -> Option<StackCheck> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut cmp = None;
    for _ in 0..4 {
        if !decoder.can_decode() {
            return None;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        if let Some(cmp) = cmp {
            // Go branches to morestack with JLS (JBE: CF or ZF); probes on
            // it rely on exactly that condition.
            return (insn.mnemonic() == Mnemonic::Jbe).then_some(StackCheck {
                cmp,
                jump: insn.ip(),
            });
        }
        if insn.mnemonic() == Mnemonic::Cmp
            && insn.memory_base() == Register::R14
            && matches!(insn.memory_displacement64(), 0x10 | 0x18)
        {
            cmp = Some(insn.ip());
        }
    }
    None
}

/// Where to probe the work of a Go function that begins with a guard
/// (`if cond { return }`): past its stack check and frame setup, the first
/// conditional jump has one side that only unwinds the frame and returns,
/// and the other side is the body; the probe goes on the first branch of
/// the body's opening straight-line block, an instruction the kernel
/// emulates (any other would be single-stepped, ten times the cost). `None`
/// unless the function has exactly that shape: the frame built (`PUSH RBP;
/// MOV RBP, RSP`) before the guard, none of `preserved` written up to the
/// probe (so it still finds those argument registers and can walk frames
/// from RBP), and nothing jumping into the block (so the branch runs once
/// per call that passes the guard).
pub fn guarded_body(code: &[u8], address: u64, preserved: &[Register]) -> Option<u64> {
    let check = stack_check(code, address)?;
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut insns: BTreeMap<u64, Instruction> = BTreeMap::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        insns.insert(insn.ip(), insn);
    }
    // Only unwinds and returns within a few instructions.
    let returns = |mut at: u64| {
        for _ in 0..4 {
            let Some(i) = insns.get(&at) else {
                return false;
            };
            match i.mnemonic() {
                Mnemonic::Ret => return true,
                Mnemonic::Add | Mnemonic::Pop | Mnemonic::Lea
                    if i.op0_register() == Register::RSP || i.op0_register() == Register::RBP => {}
                _ => return false,
            }
            at = i.next_ip();
        }
        false
    };
    let mut info = InstructionInfoFactory::new();
    let (mut pushed_bp, mut frame) = (false, false);
    for (&ip, insn) in insns.range(check.jump + 1..) {
        match insn.mnemonic() {
            Mnemonic::Push if insn.op0_register() == Register::RBP => pushed_bp = true,
            Mnemonic::Mov
                if pushed_bp
                    && insn.op0_register() == Register::RBP
                    && insn.op1_register() == Register::RSP =>
            {
                frame = true
            }
            _ => {}
        }
        if insn.flow_control() == FlowControl::ConditionalBranch {
            if !frame {
                return None;
            }
            let (taken, fallthrough) = (insn.near_branch_target(), insn.next_ip());
            let body = match (returns(taken), returns(fallthrough)) {
                (true, false) => fallthrough,
                (false, true) => taken,
                _ => return None,
            };
            return first_branch(&insns, body, ip, preserved, &mut info);
        }
        if insn.flow_control() != FlowControl::Next {
            return None; // a call or jump before the guard: not this shape
        }
        let writes = info.info(insn).used_registers().iter().any(|u| {
            matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) && preserved.contains(&u.register().full_register())
        });
        if writes {
            return None;
        }
        let _ = ip;
    }
    None
}

/// Whether `insn` writes one of `regs`.
fn writes_any(info: &mut InstructionInfoFactory, insn: &Instruction, regs: &[Register]) -> bool {
    info.info(insn).used_registers().iter().any(|u| {
        matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) && regs.contains(&u.register().full_register())
    })
}

/// The first branch in the straight-line block that starts at `body`
/// (entered only from the guard at `guard`), if `preserved` survive up to
/// it and no other jump lands in the block.
fn first_branch(
    insns: &BTreeMap<u64, Instruction>,
    body: u64,
    guard: u64,
    preserved: &[Register],
    info: &mut InstructionInfoFactory,
) -> Option<u64> {
    let mut at = body;
    let mut branch = None;
    for _ in 0..16 {
        let insn = insns.get(&at)?;
        match insn.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                branch = Some(at);
                break;
            }
            FlowControl::Next if !writes_any(info, insn, preserved) => at = insn.next_ip(),
            _ => return None,
        }
    }
    let branch = branch?;
    let lands_inside = insns.values().any(|i| {
        i.ip() != guard
            && matches!(
                i.flow_control(),
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
            )
            && (body..=branch).contains(&i.near_branch_target())
    });
    (!lands_inside).then_some(branch)
}

/// Virtual addresses of every RET in `code` (which starts at `address`).
/// Go does not embed data in functions, so a linear sweep sees every
/// instruction; an undecodable byte means we are not looking at Go code.
pub fn ret_addresses(code: &[u8], address: u64) -> Result<Vec<u64>, String> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut rets = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            // Trailing INT3 padding decodes fine; an invalid opcode does not.
            return Err(format!("invalid instruction at {:#x}", insn.ip()));
        }
        if insn.mnemonic() == Mnemonic::Ret {
            rets.push(insn.ip());
        }
    }
    if rets.is_empty() {
        return Err("no RET instruction".to_owned());
    }
    Ok(rets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_ret() {
        // cmp rsp,[r14+0x10]; jbe +1; ret; xor eax,eax; ret 8; int3
        let code = [
            0x49, 0x3b, 0x66, 0x10, 0x76, 0x01, 0xc3, 0x31, 0xc0, 0xc2, 0x08, 0x00, 0xcc,
        ];
        assert_eq!(ret_addresses(&code, 0x1000).unwrap(), vec![0x1006, 0x1009]);
    }

    #[test]
    fn c3_inside_an_instruction_is_not_a_ret() {
        // mov eax, 0xc3c3c3c3; ret
        let code = [0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3];
        assert_eq!(ret_addresses(&code, 0).unwrap(), vec![5]);
    }

    #[test]
    fn go_stack_checks() {
        // cmp rsp,[r14+0x10]; jbe +0x20
        let small = [0x49, 0x3b, 0x66, 0x10, 0x76, 0x20];
        assert_eq!(
            stack_check(&small, 0x1000),
            Some(StackCheck {
                cmp: 0x1000,
                jump: 0x1004
            })
        );
        // lea r12,[rsp-0x88]; cmp r12,[r14+0x10]; jbe rel32
        let large = [
            0x4c, 0x8d, 0xa4, 0x24, 0x78, 0xff, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86,
            0x10, 0x00, 0x00, 0x00,
        ];
        assert_eq!(
            stack_check(&large, 0),
            Some(StackCheck { cmp: 8, jump: 12 })
        );
        // lea r12,[rsp-0x28]; cmp r12,[r14+0x18]; jbe (a systemstack function)
        let sys = [
            0x4c, 0x8d, 0x64, 0x24, 0xd8, 0x4d, 0x3b, 0x66, 0x18, 0x0f, 0x86, 0x08, 0x05, 0, 0,
        ];
        assert_eq!(stack_check(&sys, 0), Some(StackCheck { cmp: 5, jump: 9 }));
        // push rbp; mov rbp,rsp (a C function)
        assert_eq!(stack_check(&[0x55, 0x48, 0x89, 0xe5, 0xc3], 0), None);
    }

    /// The start of `(*table).pruneTombstones` as Go 1.27 compiles it: stack
    /// check, frame, `if t.tombstones()*10 < t.capacity { return }`.
    const PRUNE_START: [u8; 86] = [
        0x49, 0x3b, 0x66, 0x10, // cmp rsp, [r14+0x10]
        0x0f, 0x86, 0x3c, 0x03, 0x00, 0x00, // jbe morestack
        0x55, // push rbp
        0x48, 0x89, 0xe5, // mov rbp, rsp
        0x48, 0x83, 0xec, 0x58, // sub rsp, 0x58
        0x0f, 0xb7, 0x70, 0x02, // movzx esi, word [rax+2]
        0x48, 0x8d, 0x3c, 0x76, // lea rdi, [rsi+rsi*2]
        0x48, 0x8d, 0x3c, 0x7e, // lea rdi, [rsi+rdi*2]
        0x66, 0xc1, 0xef, 0x03, // shr di, 3
        0x44, 0x0f, 0xb7, 0x00, // movzx r8d, word [rax]
        0x44, 0x29, 0xc7, // sub edi, r8d
        0x44, 0x0f, 0xb7, 0x40, 0x04, // movzx r8d, word [rax+4]
        0x44, 0x29, 0xc7, // sub edi, r8d
        0x48, 0x01, 0xff, // add rdi, rdi
        0x48, 0x8d, 0x3c, 0xbf, // lea rdi, [rdi+rdi*4]
        0x66, 0x39, 0xfe, // cmp si, di
        0x77, 0x09, // ja +9 (the return)
        0x48, 0x89, 0x44, 0x24, 0x68, // mov [rsp+0x68], rax (the body)
        0x31, 0xf6, // xor esi, esi
        0xeb, 0x06, // jmp +6 (the loop below)
        0x48, 0x83, 0xc4, 0x58, // add rsp, 0x58
        0x5d, // pop rbp
        0xc3, // ret
        0x48, 0xff, 0xc6, // inc rsi (the loop)
        0x48, 0x83, 0xfe, 0x08, // cmp rsi, 8
        0x72, 0xf7, // jb -9
        0xc3, // ret
    ];

    #[test]
    fn finds_the_body_past_a_guard() {
        let preserved = [Register::RAX, Register::RBX, Register::RCX];
        // The jmp after the body's first two instructions.
        assert_eq!(
            guarded_body(&PRUNE_START, 0x1000, &preserved),
            Some(0x1000 + 68)
        );
        // A block the loop jumps back into: no probe there.
        let mut looping = PRUNE_START;
        looping[84] = 0xed; // jb -19: back to the body's xor
        assert_eq!(guarded_body(&looping, 0x1000, &preserved), None);
        // The guard's registers are no longer the arguments: no body.
        assert_eq!(guarded_body(&PRUNE_START, 0x1000, &[Register::RDI]), None);
        // Without the frame built before the guard.
        let mut no_frame = PRUNE_START;
        no_frame[10] = 0x90; // push rbp -> nop
        assert_eq!(guarded_body(&no_frame, 0x1000, &preserved), None);
        // A function without a stack check.
        assert_eq!(guarded_body(&PRUNE_START[4..], 0, &preserved), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(ret_addresses(&[0x31, 0xc0], 0).is_err());
        assert!(ret_addresses(&[0x06, 0xc3], 0).is_err()); // push es is invalid in 64-bit mode
    }
}
