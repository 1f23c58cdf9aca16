package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Interoperability with real clients: qemu-io, qemu-img, nbdinfo, nbdcopy
// and fio's nbd engine. Missing tools skip the test, except under CI.

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required under CI: %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return p
}

func nbdURI(sock string) string { return "nbd+unix:///?socket=" + sock }

// run runs a tool with a timeout and returns its combined output.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, needTool(t, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func TestQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	sb := newSparse(8 << 20)
	sock := serve(t, &Server{Backend: sb})
	out := run(t, "qemu-io", "-f", "raw", nbdURI(sock),
		"-c", "write -P 0xab 0 1M",
		"-c", "read -P 0xab 0 1M",
		"-c", "write -P 0xcd 1M 4k",
		"-c", "aio_write -P 0x11 2M 64k",
		"-c", "aio_flush",
		"-c", "write -z 4M 1M",
		"-c", "read -P 0 4M 1M",
		"-c", "discard 1M 4k",
		"-c", "write -P 0x22 -f 3M 512",
		"-c", "flush",
		"-c", "read -P 0x11 2M 64k",
		"-c", "read -P 0x22 3M 512",
	)
	if strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io reported a failure:\n%s", out)
	}
	if !bytes.Equal(sb.bytes(0, 1<<20), bytes.Repeat([]byte{0xab}, 1<<20)) {
		t.Error("backend does not hold the 0xab pattern")
	}
	if sb.trims.Load() == 0 || sb.flushes.Load() == 0 {
		t.Errorf("trims %d flushes %d: want both used", sb.trims.Load(), sb.flushes.Load())
	}
}

func TestQemuImg(t *testing.T) {
	needTool(t, "qemu-img")
	const size = 6 << 20
	sock := serve(t, &Server{Backend: newSparse(size)})

	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", nbdURI(sock))), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != size || info.Format != "raw" {
		t.Errorf("qemu-img info: %+v", info)
	}

	dir := t.TempDir()
	src, back := filepath.Join(dir, "src.img"), filepath.Join(dir, "back.img")
	data := make([]byte, size)
	copy(data[1<<20:], pattern(1<<20, 5)) // data, then holes, then data
	copy(data[size-4096:], pattern(4096, 6))
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, nbdURI(sock))
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", nbdURI(sock), back)
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("image copied through NBD differs")
	}
	if out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, nbdURI(sock)); !strings.Contains(out, "identical") {
		t.Errorf("qemu-img compare: %s", out)
	}
}

func TestNbdinfo(t *testing.T) {
	needTool(t, "nbdinfo")
	const size = 4 << 20
	sb := newSparse(size)
	copy(sb.data[1<<20:], pattern(65536, 1))
	sb.mark(1<<20, 65536, true)
	sock := serve(t, &Server{Backend: sb, Name: "vm", Description: "test export"})

	var info struct {
		Exports []struct {
			Name         string   `json:"export-name"`
			Description  string   `json:"description"`
			Size         int64    `json:"export-size"`
			MultiConn    bool     `json:"can_multi_conn"`
			Trim         bool     `json:"can_trim"`
			Zero         bool     `json:"can_zero"`
			FastZero     bool     `json:"can_fast_zero"`
			FUA          bool     `json:"can_fua"`
			DF           bool     `json:"can_df"`
			ReadOnly     bool     `json:"is_read_only"`
			Contexts     []string `json:"contexts"`
			MinBlockSize int      `json:"block_size_minimum"`
			MaxBlockSize int      `json:"block_size_maximum"`
		} `json:"exports"`
	}
	out := run(t, "nbdinfo", "--json", "nbd+unix:///vm?socket="+sock)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	e := info.Exports[0]
	if e.Size != size || !e.MultiConn || !e.Trim || !e.Zero || !e.FastZero || !e.FUA || !e.DF || e.ReadOnly ||
		e.MinBlockSize != 1 || e.MaxBlockSize != maxPayload || e.Description != "test export" ||
		len(e.Contexts) != 1 || e.Contexts[0] != allocationCtx {
		t.Errorf("nbdinfo --json: %s", out)
	}
	if out := run(t, "nbdinfo", "--list", "--json", nbdURI(sock)); !strings.Contains(out, `"vm"`) {
		t.Errorf("nbdinfo --list: %s", out)
	}

	out = run(t, "nbdinfo", "--map", nbdURI(sock))
	want := "" +
		"         0     1048576    3  hole,zero\n" +
		"   1048576       65536    0  data\n" +
		"   1114112     3080192    3  hole,zero\n"
	if out != want {
		t.Errorf("nbdinfo --map:\n%s\nwant:\n%s", out, want)
	}
}

func TestNbdcopy(t *testing.T) {
	needTool(t, "nbdcopy")
	const size = 8 << 20
	sock := serve(t, &Server{Backend: newSparse(size)})
	dir := t.TempDir()
	src, back := filepath.Join(dir, "src"), filepath.Join(dir, "back")
	data := pattern(size, 7)
	clear(data[2<<20 : 5<<20])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "nbdcopy", "--connections=4", src, nbdURI(sock))
	run(t, "nbdcopy", nbdURI(sock), back)
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy round trip differs")
	}
}

func TestFio(t *testing.T) {
	needTool(t, "fio")
	sock := serve(t, &Server{Backend: newMem(32 << 20)})
	out := run(t, "fio", "--name=nbd", "--ioengine=nbd", "--uri="+nbdURI(sock),
		"--rw=randrw", "--bs=4k", "--iodepth=16", "--size=32M", "--io_size=16M",
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse")
	if !strings.Contains(out, "nbd;") {
		t.Errorf("fio output: %s", out)
	}
}
