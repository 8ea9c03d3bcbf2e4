//! Finds RET instructions by decoding a function's machine code, so that
//! return-side probes never need uretprobes (which break moving Go stacks).
use iced_x86::{Decoder, DecoderOptions, Mnemonic};

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
    fn rejects_garbage() {
        assert!(ret_addresses(&[0x31, 0xc0], 0).is_err());
        assert!(ret_addresses(&[0x06, 0xc3], 0).is_err()); // push es is invalid in 64-bit mode
    }
}
