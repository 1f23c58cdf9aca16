package xts

import (
	"bytes"
	"crypto/aes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"

	xxts "golang.org/x/crypto/xts"
)

// forEachImpl runs f as a subtest for every implementation this machine has.
func forEachImpl(t *testing.T, f func(t *testing.T, im impl)) {
	for _, im := range availableImpls() {
		t.Run(im.String(), func(t *testing.T) { f(t, im) })
	}
}

func mustCipher(t testing.TB, key []byte, im impl) *Cipher {
	t.Helper()
	c, err := newCipher(key, im)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestIEEEVectors(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, v := range ieeeVectors {
			t.Run(v.name, func(t *testing.T) {
				c := mustCipher(t, mustHex(t, v.key), im)
				pt, ct := mustHex(t, v.plaintext), mustHex(t, v.ciphertext)
				// XTS has no chaining, so a shorter data unit is the prefix
				// of a whole sector with the same sequence number.
				buf := make([]byte, SectorSize)
				copy(buf, pt)
				c.Encrypt(buf, buf, v.sector)
				if !bytes.Equal(buf[:len(ct)], ct) {
					t.Fatalf("Encrypt:\n got %x\nwant %x", buf[:len(ct)], ct)
				}
				c.Decrypt(buf, buf, v.sector)
				if !bytes.Equal(buf[:len(pt)], pt) {
					t.Fatalf("Decrypt:\n got %x\nwant %x", buf[:len(pt)], pt)
				}
			})
		}
	})
}

// refEncrypt encrypts with golang.org/x/crypto/xts, sector by sector.
func refCrypt(t testing.TB, key, dst, src []byte, sector uint64, decrypt bool) {
	t.Helper()
	ref, err := xxts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(src); off += SectorSize {
		if decrypt {
			ref.Decrypt(dst[off:off+SectorSize], src[off:off+SectorSize], sector)
		} else {
			ref.Encrypt(dst[off:off+SectorSize], src[off:off+SectorSize], sector)
		}
		sector++
	}
}

func TestAgainstXCrypto(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	sectors := []uint64{0, 1, 0xff, 1 << 32, 1<<63 - 1, ^uint64(0) - 40, ^uint64(0) - 1, ^uint64(0)}
	// Sector counts around the tweak batch (32) and the 8-block groups.
	counts := []int{1, 2, 7, 8, 9, 31, 32, 33, 64, 65, 100}
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, keyLen := range []int{32, 64} {
			for i := range 40 {
				key := make([]byte, keyLen)
				fillRand(rng, key)
				sector := sectors[i%len(sectors)]
				if i >= len(sectors) {
					sector = rng.Uint64()
				}
				n := counts[rng.IntN(len(counts))]
				c := mustCipher(t, key, im)
				checkAgainstRef(t, c, key, randBytes(rng, n*SectorSize), sector)
			}
		}
	})
}

func fillRand(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	fillRand(rng, b)
	return b
}

// checkAgainstRef compares Encrypt and Decrypt of c, in place and out of
// place, with x/crypto/xts.
func checkAgainstRef(t testing.TB, c *Cipher, key, pt []byte, sector uint64) {
	t.Helper()
	want := make([]byte, len(pt))
	refCrypt(t, key, want, pt, sector, false)
	wantDec := make([]byte, len(pt))
	refCrypt(t, key, wantDec, pt, sector, true)

	// Out of place, with an oversized dst whose tail must stay untouched.
	got := make([]byte, len(pt)+SectorSize)
	c.Encrypt(got, pt, sector)
	if !bytes.Equal(got[:len(pt)], want) {
		t.Fatalf("Encrypt(key %x, sector %#x, %d bytes) differs from x/crypto/xts at byte %d",
			key, sector, len(pt), firstDiff(got, want))
	}
	if !allZero(got[len(pt):]) {
		t.Fatalf("Encrypt wrote past len(src)")
	}
	c.Decrypt(got, pt, sector)
	if !bytes.Equal(got[:len(pt)], wantDec) {
		t.Fatalf("Decrypt(key %x, sector %#x, %d bytes) differs from x/crypto/xts at byte %d",
			key, sector, len(pt), firstDiff(got, wantDec))
	}

	// In place, round trip.
	buf := bytes.Clone(pt)
	c.Encrypt(buf, buf, sector)
	if !bytes.Equal(buf, want) {
		t.Fatalf("in-place Encrypt differs from x/crypto/xts")
	}
	c.Decrypt(buf, buf, sector)
	if !bytes.Equal(buf, pt) {
		t.Fatalf("in-place Decrypt did not restore the plaintext")
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// TestImplsAgree runs every implementation against the generic one on the
// same large random input, one call for many sectors.
func TestImplsAgree(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, keyLen := range []int{32, 64} {
		key := randBytes(rng, keyLen)
		pt := randBytes(rng, 1000*SectorSize)
		sector := ^uint64(0) - 500 // wraps around mid-buffer
		gen := mustCipher(t, key, implGeneric)
		wantEnc := make([]byte, len(pt))
		wantDec := make([]byte, len(pt))
		gen.Encrypt(wantEnc, pt, sector)
		gen.Decrypt(wantDec, pt, sector)
		forEachImpl(t, func(t *testing.T, im impl) {
			c := mustCipher(t, key, im)
			got := make([]byte, len(pt))
			c.Encrypt(got, pt, sector)
			if !bytes.Equal(got, wantEnc) {
				t.Fatalf("%d-byte key: Encrypt differs from generic at byte %d", keyLen, firstDiff(got, wantEnc))
			}
			c.Decrypt(got, pt, sector)
			if !bytes.Equal(got, wantDec) {
				t.Fatalf("%d-byte key: Decrypt differs from generic at byte %d", keyLen, firstDiff(got, wantDec))
			}
		})
	}
}

func TestParallel(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	key := randBytes(rng, 64)
	c, err := New(key)
	if err != nil {
		t.Fatal(err)
	}
	// More Ps than cores, so that the split into uneven runs is exercised.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(7))
	for _, size := range []int{0, SectorSize, ParallelThreshold - SectorSize, ParallelThreshold,
		ParallelThreshold + 3*SectorSize, 4<<20 + 7*SectorSize} {
		pt := randBytes(rng, size)
		sector := ^uint64(0) - 100
		want := make([]byte, size)
		c.Encrypt(want, pt, sector)
		got := make([]byte, size)
		c.EncryptParallel(got, pt, sector)
		if !bytes.Equal(got, want) {
			t.Fatalf("size %d: EncryptParallel differs from Encrypt at byte %d", size, firstDiff(got, want))
		}
		c.DecryptParallel(got, got, sector)
		if !bytes.Equal(got, pt) {
			t.Fatalf("size %d: DecryptParallel did not restore the plaintext", size)
		}
	}
}

// TestConcurrentUse shares one Cipher between goroutines (meaningful under -race).
func TestConcurrentUse(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	key := randBytes(rng, 64)
	forEachImpl(t, func(t *testing.T, im impl) {
		c := mustCipher(t, key, im)
		pt := randBytes(rng, 64*SectorSize)
		want := make([]byte, len(pt))
		c.Encrypt(want, pt, 42)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for range 20 {
					got := make([]byte, len(pt))
					c.Encrypt(got, pt, 42)
					if !bytes.Equal(got, want) {
						t.Error("concurrent Encrypt gave a different result")
						return
					}
					c.Decrypt(got, got, 42)
					if !bytes.Equal(got, pt) {
						t.Error("concurrent Decrypt did not restore the plaintext")
						return
					}
				}
			})
		}
		wg.Wait()
	})
}

func TestNewKeySizes(t *testing.T) {
	for _, n := range []int{0, 16, 24, 31, 33, 48, 63, 65, 128} {
		if _, err := New(make([]byte, n)); err == nil {
			t.Errorf("New with a %d-byte key succeeded", n)
		}
	}
	for _, n := range []int{32, 64} {
		if _, err := New(make([]byte, n)); err != nil {
			t.Errorf("New with a %d-byte key: %v", n, err)
		}
	}
}

func TestMisusePanics(t *testing.T) {
	c, err := New(make([]byte, 64))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4*SectorSize)
	tests := []struct {
		name     string
		dst, src []byte
		want     string
	}{
		{"partial sector", buf, buf[:SectorSize+16], "multiple of the sector size"},
		{"short dst", buf[:SectorSize], buf[SectorSize:], "output smaller"},
		{"overlap ahead", buf[SectorSize:], buf[:2*SectorSize], "overlap"},
		{"overlap behind", buf[:2*SectorSize], buf[16 : 16+2*SectorSize], "overlap"},
	}
	ops := map[string]func(dst, src []byte){
		"Encrypt":         func(d, s []byte) { c.Encrypt(d, s, 0) },
		"Decrypt":         func(d, s []byte) { c.Decrypt(d, s, 0) },
		"EncryptParallel": func(d, s []byte) { c.EncryptParallel(d, s, 0) },
		"DecryptParallel": func(d, s []byte) { c.DecryptParallel(d, s, 0) },
	}
	for _, tt := range tests {
		for name, op := range ops {
			t.Run(tt.name+"/"+name, func(t *testing.T) {
				defer func() {
					r := recover()
					if r == nil || !strings.Contains(fmt.Sprint(r), tt.want) {
						t.Fatalf("panic %v, want one mentioning %q", r, tt.want)
					}
				}()
				op(tt.dst, tt.src)
			})
		}
	}
	// Empty input and a dst longer than src are fine.
	c.Encrypt(nil, nil, 0)
	c.Encrypt(buf, buf[:SectorSize], 0)
}

// TestKeyExpansion checks the Go key schedule against FIPS-197 Appendix A:
// the last word of the expanded key.
func TestKeyExpansion(t *testing.T) {
	tests := []struct {
		key, last string
	}{
		{"2b7e151628aed2a6abf7158809cf4f3c", "b6630ca6"},
		{"603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", "706c631e"},
	}
	for _, tt := range tests {
		var rk roundKeys
		nr := expandKey(&rk, mustHex(t, tt.key))
		if got := hex.EncodeToString(rk[nr*16+12 : nr*16+16]); got != tt.last {
			t.Errorf("key %s: last word %s, want %s", tt.key, got, tt.last)
		}
	}
	// Spot-check the S-box.
	for in, out := range map[byte]byte{0x00: 0x63, 0x01: 0x7c, 0x53: 0xed, 0xff: 0x16} {
		if got := subByte(in); got != out {
			t.Errorf("S-box(%#02x) = %#02x, want %#02x", in, got, out)
		}
	}
}

// opensslXTS encrypts one sector with OpenSSL: `openssl enc` where it
// accepts XTS (OpenSSL 3.0's does not), else through Python's cryptography
// package, which calls OpenSSL's EVP XTS. Both take the tweak as the IV.
func opensslXTS(t *testing.T, cipherName string, key, iv, pt []byte) []byte {
	t.Helper()
	if openssl, err := exec.LookPath("openssl"); err == nil {
		cmd := exec.Command(openssl, "enc", "-"+cipherName, "-nopad",
			"-K", hex.EncodeToString(key), "-iv", hex.EncodeToString(iv))
		cmd.Stdin = bytes.NewReader(pt)
		if out, err := cmd.Output(); err == nil && len(out) == len(pt) {
			return out
		}
	}
	const script = `import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
e = Cipher(algorithms.AES(bytes.fromhex(sys.argv[1])), modes.XTS(bytes.fromhex(sys.argv[2]))).encryptor()
sys.stdout.buffer.write(e.update(sys.stdin.buffer.read()) + e.finalize())
`
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("neither openssl enc with XTS nor python3 is available")
	}
	cmd := exec.Command(python, "-c", script, hex.EncodeToString(key), hex.EncodeToString(iv))
	cmd.Stdin = bytes.NewReader(pt)
	out, err := cmd.Output()
	if err != nil {
		t.Skipf("no OpenSSL XTS available (python3 cryptography: %v)", err)
	}
	return out
}

// TestOpenSSL cross-checks single sectors with OpenSSL's aes-xts, the
// cipher dm-crypt's aes-xts-plain64 matches.
func TestOpenSSL(t *testing.T) {
	if testing.Short() {
		t.Skip("runs an external command")
	}
	rng := rand.New(rand.NewPCG(9, 10))
	for _, tt := range []struct {
		name   string
		keyLen int
		sector uint64
	}{
		{"aes-256-xts", 64, 0},
		{"aes-256-xts", 64, 0x1234567890},
		{"aes-256-xts", 64, ^uint64(0)},
		{"aes-128-xts", 32, 7},
	} {
		key := randBytes(rng, tt.keyLen)
		pt := randBytes(rng, 2*SectorSize)
		var iv [16]byte
		binary.LittleEndian.PutUint64(iv[:], tt.sector)
		want := opensslXTS(t, tt.name, key, iv[:], pt[:SectorSize])
		binary.LittleEndian.PutUint64(iv[:], tt.sector+1)
		want = append(want, opensslXTS(t, tt.name, key, iv[:], pt[SectorSize:])...)
		forEachImpl(t, func(t *testing.T, im impl) {
			got := make([]byte, len(pt))
			mustCipher(t, key, im).Encrypt(got, pt, tt.sector)
			if !bytes.Equal(got, want) {
				t.Fatalf("%s sector %#x: differs from OpenSSL at byte %d", tt.name, tt.sector, firstDiff(got, want))
			}
		})
	}
}

// FuzzXTS compares every implementation with x/crypto/xts. The key is
// stretched or cut to 32 or 64 bytes and the data cut to whole sectors.
func FuzzXTS(f *testing.F) {
	f.Add(make([]byte, 64), uint64(0), make([]byte, SectorSize), false)
	f.Add(bytes.Repeat([]byte{0xa5}, 32), ^uint64(0), make([]byte, 3*SectorSize), true)
	f.Add([]byte("k"), uint64(1)<<40, bytes.Repeat([]byte{1, 2, 3}, 600), false)
	f.Fuzz(func(t *testing.T, keySeed []byte, sector uint64, data []byte, long bool) {
		keyLen := 32
		if long {
			keyLen = 64
		}
		key := make([]byte, keyLen)
		for i := range key {
			if len(keySeed) > 0 {
				key[i] = keySeed[i%len(keySeed)] + byte(i/len(keySeed))
			}
		}
		// Cap the work per input (36 sectors still crosses a tweak batch)
		// so that minimizing a large input stays quick.
		data = data[:min(len(data), 36*SectorSize)/SectorSize*SectorSize]
		if len(data) == 0 {
			data = make([]byte, SectorSize)
			copy(data, keySeed)
		}
		for _, im := range availableImpls() {
			checkAgainstRef(t, mustCipher(t, key, im), key, data, sector)
		}
	})
}

var benchSizes = []struct {
	name string
	n    int
}{
	{"4KiB", 4 << 10},
	{"64KiB", 64 << 10},
	{"1MiB", 1 << 20},
}

func benchCrypt(b *testing.B, c *Cipher, size int, decrypt, parallel bool) {
	buf := make([]byte, size)
	b.SetBytes(int64(size))
	for b.Loop() {
		switch {
		case parallel && decrypt:
			c.DecryptParallel(buf, buf, 1)
		case parallel:
			c.EncryptParallel(buf, buf, 1)
		case decrypt:
			c.Decrypt(buf, buf, 1)
		default:
			c.Encrypt(buf, buf, 1)
		}
	}
}

// BenchmarkEncrypt and BenchmarkDecrypt measure New's choice of
// implementation with an AES-256 key; BenchmarkImpl measures every path.
func BenchmarkEncrypt(b *testing.B) {
	c, _ := New(make([]byte, 64))
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) { benchCrypt(b, c, s.n, false, false) })
	}
}

func BenchmarkDecrypt(b *testing.B) {
	c, _ := New(make([]byte, 64))
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) { benchCrypt(b, c, s.n, true, false) })
	}
}

func BenchmarkEncryptParallel(b *testing.B) {
	c, _ := New(make([]byte, 64))
	for _, n := range []int{1 << 20, 16 << 20} {
		b.Run(fmt.Sprintf("%dMiB", n>>20), func(b *testing.B) { benchCrypt(b, c, n, false, true) })
	}
}

func BenchmarkImpl(b *testing.B) {
	for _, im := range availableImpls() {
		for _, keyLen := range []int{64, 32} {
			c, _ := newCipher(make([]byte, keyLen), im)
			name := fmt.Sprintf("%s/AES-%d", im, keyLen*4)
			for _, s := range benchSizes {
				b.Run(name+"/Encrypt/"+s.name, func(b *testing.B) { benchCrypt(b, c, s.n, false, false) })
				b.Run(name+"/Decrypt/"+s.name, func(b *testing.B) { benchCrypt(b, c, s.n, true, false) })
			}
		}
	}
}

// BenchmarkXCryptoXTS is the baseline: golang.org/x/crypto/xts, AES-256.
func BenchmarkXCryptoXTS(b *testing.B) {
	ref, _ := xxts.NewCipher(aes.NewCipher, make([]byte, 64))
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) {
			buf := make([]byte, s.n)
			b.SetBytes(int64(s.n))
			for b.Loop() {
				for off := 0; off < len(buf); off += SectorSize {
					ref.Encrypt(buf[off:off+SectorSize], buf[off:off+SectorSize], uint64(off/SectorSize))
				}
			}
		})
	}
}
