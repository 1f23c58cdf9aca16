package qmp

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestQEMU drives a real QEMU through its QMP socket. It is skipped when
// qemu-system-x86_64 is missing, unless CI is set.
func TestQEMU(t *testing.T) {
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("qemu-system-x86_64 is required when CI is set: %v", err)
		}
		t.Skipf("qemu-system-x86_64 not found: %v", err)
	}
	sock := filepath.Join(shortTempDir(t), "qmp.sock")
	var stderr bytes.Buffer
	cmd := exec.Command(bin,
		"-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off", "-S")
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	waited := make(chan struct{})
	go func() {
		exited <- cmd.Wait()
		close(waited)
	}()
	t.Cleanup(func() {
		select {
		case <-waited:
		default:
			cmd.Process.Kill()
			<-waited
		}
	})

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	m := dialRetry(ctx, t, sock, exited, &stderr)
	defer m.Close()
	t.Logf("QEMU %+v", m.Version())
	if m.Version().Major == 0 {
		t.Errorf("greeting had no version: %+v", m.Version())
	}

	wantStatus := func(status string, running bool) {
		t.Helper()
		st, err := m.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Status != status || st.Running != running {
			t.Fatalf("Status() = %+v, want %s (running %v)", st, status, running)
		}
	}
	wantEvent := func(name string) {
		t.Helper()
		select {
		case ev := <-m.Events():
			if ev.Name != name || ev.Time.IsZero() {
				t.Fatalf("got event %+v, want %s with a timestamp", ev, name)
			}
		case <-ctx.Done():
			t.Fatalf("no %s event", name)
		}
	}

	wantStatus("prelaunch", false)

	var qe *Error
	if err := m.Execute(ctx, "no-such-command", nil, nil); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command: got %v, want CommandNotFound", err)
	}
	if err := m.Execute(ctx, "query-status", map[string]int{"bogus": 1}, nil); !errors.As(err, &qe) || qe.Class != "GenericError" {
		t.Fatalf("bad arguments: got %v, want GenericError", err)
	}

	if err := m.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	wantEvent("RESUME")
	wantStatus("running", true)

	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	wantEvent("STOP")
	wantStatus("paused", false)

	if err := m.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("QEMU exited with %v; stderr:\n%s", err, stderr.String())
		}
	case <-ctx.Done():
		t.Fatal("QEMU did not exit after quit")
	}
	if err := m.Stop(ctx); !errors.Is(err, ErrDisconnected) {
		t.Errorf("command after Quit: got %v, want ErrDisconnected", err)
	}
}

// dialRetry connects once QEMU has created its socket.
func dialRetry(ctx context.Context, t *testing.T, sock string, exited <-chan error, stderr *bytes.Buffer) *Monitor {
	t.Helper()
	for {
		m, err := Dial(ctx, sock)
		if err == nil {
			return m
		}
		select {
		case err := <-exited:
			t.Fatalf("QEMU exited early (%v); stderr:\n%s", err, stderr.String())
		case <-ctx.Done():
			t.Fatalf("cannot connect to QEMU: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
