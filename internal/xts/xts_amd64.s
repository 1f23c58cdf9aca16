//go:build amd64 && !purego

#include "textflag.h"

// AES-XTS for 512-byte sectors, encrypting or decrypting nsec sectors whose
// encrypted initial tweaks are given (one 16-byte block per sector).
//
// Tweaks are kept as 128-bit little-endian integers, block j of a sector
// using T·αʲ. Two tricks are shared by both paths:
//   - the first round key is XORed into the block together with the tweak;
//   - the last round key is XORed into the tweak before AES*LAST, since
//     AESENCLAST(x, k^t) = AESENCLAST(x, k)^t (likewise AESDECLAST), which
//     removes the final XOR with the tweak.
// AES-128 and AES-256 share the code: rounds 10-13 are skipped when nr == 10.

// Reduction constant for multiplying by α in XMM: dword 0 gets 0x87 when
// bit 127 is carried out, dword 2 gets 1 when bit 63 moves to the high qword.
DATA xtsGF<>+0(SB)/8, $0x87
DATA xtsGF<>+8(SB)/8, $1
GLOBL xtsGF<>(SB), RODATA|NOPTR, $16

// Per-qword shift counts that turn a broadcast tweak T into
// (T, T·α, T·α², T·α³) across the four 128-bit lanes of a ZMM register.
DATA xtsShl<>+0(SB)/8, $0
DATA xtsShl<>+8(SB)/8, $0
DATA xtsShl<>+16(SB)/8, $1
DATA xtsShl<>+24(SB)/8, $1
DATA xtsShl<>+32(SB)/8, $2
DATA xtsShl<>+40(SB)/8, $2
DATA xtsShl<>+48(SB)/8, $3
DATA xtsShl<>+56(SB)/8, $3
GLOBL xtsShl<>(SB), RODATA|NOPTR, $64

DATA xtsShr<>+0(SB)/8, $64
DATA xtsShr<>+8(SB)/8, $64
DATA xtsShr<>+16(SB)/8, $63
DATA xtsShr<>+24(SB)/8, $63
DATA xtsShr<>+32(SB)/8, $62
DATA xtsShr<>+40(SB)/8, $62
DATA xtsShr<>+48(SB)/8, $61
DATA xtsShr<>+56(SB)/8, $61
GLOBL xtsShr<>(SB), RODATA|NOPTR, $64

// All macros come before the first TEXT: go vet's asmdecl check would
// otherwise attribute their argument references to the preceding function.

// ---- XMM path: 8 blocks interleaved ----
//
// AX round keys, CX rounds, R9 last round key, SI src, DI dst.
// X0-X7 blocks, X8 round key / scratch, X9 running tweak, X10 scratch,
// X11 first round key, X12 last round key, X13 xtsGF.

#define AES8(op, K) \
	op K, X0; op K, X1; op K, X2; op K, X3; \
	op K, X4; op K, X5; op K, X6; op K, X7

#define ROUND8(op, off) \
	MOVOU off(AX), X8; \
	AES8(op, X8)

#define ROUNDS8_1_9(op) \
	ROUND8(op, 16); ROUND8(op, 32); ROUND8(op, 48); \
	ROUND8(op, 64); ROUND8(op, 80); ROUND8(op, 96); \
	ROUND8(op, 112); ROUND8(op, 128); ROUND8(op, 144)

#define ROUNDS8_10_13(op) \
	ROUND8(op, 160); ROUND8(op, 176); ROUND8(op, 192); ROUND8(op, 208)

// X9 *= α (X8 scratch). PSHUFD brings the sign bits of dwords 3 and 1 to
// dwords 0 and 2, PSRAL spreads them into masks, and PADDQ doubles each qword.
#define MULALPHA \
	PSHUFD $0x13, X9, X8; \
	PSRAL $31, X8; \
	PAND X13, X8; \
	PADDQ X9, X9; \
	PXOR X8, X9

// Block i: B = src ^ T ^ k0; saves T ^ klast on the stack; advances T.
#define TWEAK(i, B) \
	MOVOU (i*16)(SI), B; \
	PXOR X9, B; \
	PXOR X11, B; \
	MOVOU X9, X10; \
	PXOR X12, X10; \
	MOVOU X10, (i*16)(SP); \
	MULALPHA

#define LAST(op, i, B) \
	MOVOU (i*16)(SP), X8; \
	op X8, B; \
	MOVOU B, (i*16)(DI)

#define XTS8_HEAD \
	TWEAK(0, X0); TWEAK(1, X1); TWEAK(2, X2); TWEAK(3, X3); \
	TWEAK(4, X4); TWEAK(5, X5); TWEAK(6, X6); TWEAK(7, X7)

#define XTS8_TAIL(op) \
	LAST(op, 0, X0); LAST(op, 1, X1); LAST(op, 2, X2); LAST(op, 3, X3); \
	LAST(op, 4, X4); LAST(op, 5, X5); LAST(op, 6, X6); LAST(op, 7, X7)

#define XMM_PROLOGUE \
	MOVQ nr+0(FP), CX; \
	MOVQ rk+8(FP), AX; \
	MOVQ dst+16(FP), DI; \
	MOVQ src+24(FP), SI; \
	MOVQ tweaks+32(FP), DX; \
	MOVQ nsec+40(FP), BX; \
	MOVQ CX, R9; \
	SHLQ $4, R9; \
	ADDQ AX, R9; \
	MOVOU xtsGF<>(SB), X13; \
	MOVOU (AX), X11; \
	MOVOU (R9), X12

// ---- ZMM path: 16 blocks as 4 ZMM registers of 4 blocks ----
//
// AX round keys, CX rounds, R9 last round key, SI src, DI dst.
// Z0-Z3 blocks, Z4-Z7 tweaks of the 16 blocks in flight, Z8-Z12 scratch,
// Z14/Z15 xtsShr/xtsShl, Z16-Z29 round keys 0-13 broadcast to all lanes,
// Z30 last round key, Z31 0x87 in every qword.

#define AES16(op, K) \
	op K, Z0, Z0; op K, Z1, Z1; op K, Z2, Z2; op K, Z3, Z3

#define ROUNDS16_1_9(op) \
	AES16(op, Z17); AES16(op, Z18); AES16(op, Z19); \
	AES16(op, Z20); AES16(op, Z21); AES16(op, Z22); \
	AES16(op, Z23); AES16(op, Z24); AES16(op, Z25)

#define ROUNDS16_10_13(op) \
	AES16(op, Z26); AES16(op, Z27); AES16(op, Z28); AES16(op, Z29)

// Load 16 blocks at off(SI), XOR in tweak and first round key; put
// tweak ^ last round key in Z8-Z11.
#define XTS16_HEAD(off) \
	VMOVDQU64 (off+0)(SI), Z0; \
	VMOVDQU64 (off+64)(SI), Z1; \
	VMOVDQU64 (off+128)(SI), Z2; \
	VMOVDQU64 (off+192)(SI), Z3; \
	VPTERNLOGD $0x96, Z16, Z4, Z0; \
	VPTERNLOGD $0x96, Z16, Z5, Z1; \
	VPTERNLOGD $0x96, Z16, Z6, Z2; \
	VPTERNLOGD $0x96, Z16, Z7, Z3; \
	VPXORD Z30, Z4, Z8; \
	VPXORD Z30, Z5, Z9; \
	VPXORD Z30, Z6, Z10; \
	VPXORD Z30, Z7, Z11

#define XTS16_TAIL(op, off) \
	op Z8, Z0, Z0; \
	op Z9, Z1, Z1; \
	op Z10, Z2, Z2; \
	op Z11, Z3, Z3; \
	VMOVDQU64 Z0, (off+0)(DI); \
	VMOVDQU64 Z1, (off+64)(DI); \
	VMOVDQU64 Z2, (off+128)(DI); \
	VMOVDQU64 Z3, (off+192)(DI)

// D = T·α^(8·bytes) in each lane: a byte shift of the 128-bit lane, with
// the bits shifted out folded back in as c·(x⁷+x²+x+1).
#define MULBYTES(bytes, rbytes, T, D) \
	VPSRLDQ $rbytes, T, Z12; \
	VPCLMULQDQ $0x00, Z31, Z12, Z12; \
	VPSLLDQ $bytes, T, D; \
	VPXORD Z12, D, D

// D = T·α⁴ in each lane: shift each qword, carry the low qword's top bits into
// the high qword and fold the high qword's top bits back into the low one.
#define MULALPHA4(T, D) \
	VPSLLQ $4, T, Z8; \
	VPSRLQ $60, T, Z9; \
	VPSLLDQ $8, Z9, D; \
	VPSRLDQ $8, Z9, Z9; \
	VPCLMULQDQ $0x00, Z31, Z9, Z9; \
	VPTERNLOGD $0x96, Z9, Z8, D

// From the initial tweak T at (DX), Z4..Z7 = T·α⁰ … T·α¹⁵, lane by lane.
#define FIRST_TWEAKS \
	VBROADCASTI32X4 (DX), Z4; \
	VPSLLVQ Z15, Z4, Z8; \
	VPSRLVQ Z14, Z4, Z9; \
	VPSLLDQ $8, Z9, Z4; \
	VPSRLDQ $8, Z9, Z9; \
	VPCLMULQDQ $0x00, Z31, Z9, Z9; \
	VPTERNLOGD $0x96, Z9, Z8, Z4; \
	MULALPHA4(Z4, Z5); \
	MULBYTES(1, 15, Z4, Z6); \
	MULBYTES(1, 15, Z5, Z7)

// Advance the four tweak registers by 16 blocks.
#define NEXT_TWEAKS \
	MULBYTES(2, 14, Z4, Z4); \
	MULBYTES(2, 14, Z5, Z5); \
	MULBYTES(2, 14, Z6, Z6); \
	MULBYTES(2, 14, Z7, Z7)

#define ZMM_PROLOGUE \
	MOVQ nr+0(FP), CX; \
	MOVQ rk+8(FP), AX; \
	MOVQ dst+16(FP), DI; \
	MOVQ src+24(FP), SI; \
	MOVQ tweaks+32(FP), DX; \
	MOVQ nsec+40(FP), BX; \
	MOVQ CX, R9; \
	SHLQ $4, R9; \
	ADDQ AX, R9; \
	VBROADCASTI32X4 0(AX), Z16; \
	VBROADCASTI32X4 16(AX), Z17; \
	VBROADCASTI32X4 32(AX), Z18; \
	VBROADCASTI32X4 48(AX), Z19; \
	VBROADCASTI32X4 64(AX), Z20; \
	VBROADCASTI32X4 80(AX), Z21; \
	VBROADCASTI32X4 96(AX), Z22; \
	VBROADCASTI32X4 112(AX), Z23; \
	VBROADCASTI32X4 128(AX), Z24; \
	VBROADCASTI32X4 144(AX), Z25; \
	VBROADCASTI32X4 160(AX), Z26; \
	VBROADCASTI32X4 176(AX), Z27; \
	VBROADCASTI32X4 192(AX), Z28; \
	VBROADCASTI32X4 208(AX), Z29; \
	VBROADCASTI32X4 (R9), Z30; \
	MOVQ $0x87, R8; \
	VPBROADCASTQ R8, Z31; \
	VMOVDQU64 xtsShl<>(SB), Z15; \
	VMOVDQU64 xtsShr<>(SB), Z14

// ---- Functions ----

// func xtsEncAESNI(nr int, rk *byte, dst, src, tweaks *byte, nsec int)
TEXT ·xtsEncAESNI(SB), NOSPLIT, $128-48
	XMM_PROLOGUE
	TESTQ BX, BX
	JZ    encDone

encSector:
	MOVOU (DX), X9
	ADDQ  $16, DX
	MOVQ  $4, R10 // 4 groups of 8 blocks

encGroup:
	XTS8_HEAD
	ROUNDS8_1_9(AESENC)
	CMPQ CX, $10
	JEQ  encLast
	ROUNDS8_10_13(AESENC)

encLast:
	XTS8_TAIL(AESENCLAST)
	ADDQ $128, SI
	ADDQ $128, DI
	DECQ R10
	JNZ  encGroup
	DECQ BX
	JNZ  encSector

encDone:
	RET

// func xtsDecAESNI(nr int, rk *byte, dst, src, tweaks *byte, nsec int)
TEXT ·xtsDecAESNI(SB), NOSPLIT, $128-48
	XMM_PROLOGUE
	TESTQ BX, BX
	JZ    decDone

decSector:
	MOVOU (DX), X9
	ADDQ  $16, DX
	MOVQ  $4, R10

decGroup:
	XTS8_HEAD
	ROUNDS8_1_9(AESDEC)
	CMPQ CX, $10
	JEQ  decLast
	ROUNDS8_10_13(AESDEC)

decLast:
	XTS8_TAIL(AESDECLAST)
	ADDQ $128, SI
	ADDQ $128, DI
	DECQ R10
	JNZ  decGroup
	DECQ BX
	JNZ  decSector

decDone:
	RET

// func encryptBlocksAESNI(nr int, rk *byte, dst, src *byte, n int)
//
// Plain AES encryption of n independent blocks (the sectors' tweaks), eight
// at a time, then one at a time.
TEXT ·encryptBlocksAESNI(SB), NOSPLIT, $0-40
	MOVQ nr+0(FP), CX
	MOVQ rk+8(FP), AX
	MOVQ dst+16(FP), DI
	MOVQ src+24(FP), SI
	MOVQ n+32(FP), BX
	MOVQ CX, R9
	SHLQ $4, R9
	ADDQ AX, R9
	MOVOU (AX), X11
	MOVOU (R9), X12
	CMPQ BX, $8
	JB   ecbTail

ecbLoop8:
	MOVOU 0(SI), X0
	MOVOU 16(SI), X1
	MOVOU 32(SI), X2
	MOVOU 48(SI), X3
	MOVOU 64(SI), X4
	MOVOU 80(SI), X5
	MOVOU 96(SI), X6
	MOVOU 112(SI), X7
	AES8(PXOR, X11)
	ROUNDS8_1_9(AESENC)
	CMPQ CX, $10
	JEQ  ecbLast8
	ROUNDS8_10_13(AESENC)

ecbLast8:
	AES8(AESENCLAST, X12)
	MOVOU X0, 0(DI)
	MOVOU X1, 16(DI)
	MOVOU X2, 32(DI)
	MOVOU X3, 48(DI)
	MOVOU X4, 64(DI)
	MOVOU X5, 80(DI)
	MOVOU X6, 96(DI)
	MOVOU X7, 112(DI)
	ADDQ $128, SI
	ADDQ $128, DI
	SUBQ $8, BX
	CMPQ BX, $8
	JAE  ecbLoop8

ecbTail:
	TESTQ BX, BX
	JZ    ecbDone

ecbLoop1:
	MOVOU (SI), X0
	PXOR  X11, X0
	LEAQ  16(AX), R10
	LEAQ  -1(CX), R11

ecbRound1:
	MOVOU  (R10), X8
	AESENC X8, X0
	ADDQ   $16, R10
	DECQ   R11
	JNZ    ecbRound1
	AESENCLAST X12, X0
	MOVOU X0, (DI)
	ADDQ  $16, SI
	ADDQ  $16, DI
	DECQ  BX
	JNZ   ecbLoop1

ecbDone:
	RET

// func xtsEncVAES(nr int, rk *byte, dst, src, tweaks *byte, nsec int)
TEXT ·xtsEncVAES(SB), NOSPLIT, $0-48
	ZMM_PROLOGUE
	TESTQ BX, BX
	JZ    vencDone

vencSector:
	FIRST_TWEAKS
	ADDQ $16, DX
	XTS16_HEAD(0)
	ROUNDS16_1_9(VAESENC)
	CMPQ CX, $10
	JEQ  vencLast1
	ROUNDS16_10_13(VAESENC)

vencLast1:
	XTS16_TAIL(VAESENCLAST, 0)
	NEXT_TWEAKS
	XTS16_HEAD(256)
	ROUNDS16_1_9(VAESENC)
	CMPQ CX, $10
	JEQ  vencLast2
	ROUNDS16_10_13(VAESENC)

vencLast2:
	XTS16_TAIL(VAESENCLAST, 256)
	ADDQ $512, SI
	ADDQ $512, DI
	DECQ BX
	JNZ  vencSector

vencDone:
	VZEROUPPER
	RET

// func xtsDecVAES(nr int, rk *byte, dst, src, tweaks *byte, nsec int)
TEXT ·xtsDecVAES(SB), NOSPLIT, $0-48
	ZMM_PROLOGUE
	TESTQ BX, BX
	JZ    vdecDone

vdecSector:
	FIRST_TWEAKS
	ADDQ $16, DX
	XTS16_HEAD(0)
	ROUNDS16_1_9(VAESDEC)
	CMPQ CX, $10
	JEQ  vdecLast1
	ROUNDS16_10_13(VAESDEC)

vdecLast1:
	XTS16_TAIL(VAESDECLAST, 0)
	NEXT_TWEAKS
	XTS16_HEAD(256)
	ROUNDS16_1_9(VAESDEC)
	CMPQ CX, $10
	JEQ  vdecLast2
	ROUNDS16_10_13(VAESDEC)

vdecLast2:
	XTS16_TAIL(VAESDECLAST, 256)
	ADDQ $512, SI
	ADDQ $512, DI
	DECQ BX
	JNZ  vdecSector

vdecDone:
	VZEROUPPER
	RET
