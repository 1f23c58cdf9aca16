package qmp

import (
	"context"
	"errors"
	"fmt"
)

// StatusInfo is the answer to query-status.
type StatusInfo struct {
	// Status is QEMU's run state, such as "prelaunch", "running",
	// "paused" or "shutdown".
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

// Status runs query-status.
func (m *Monitor) Status(ctx context.Context) (StatusInfo, error) {
	var s StatusInfo
	if err := m.Execute(ctx, "query-status", nil, &s); err != nil {
		return StatusInfo{}, err
	}
	return s, nil
}

// Stop pauses the guest's vCPUs (stop).
func (m *Monitor) Stop(ctx context.Context) error {
	return m.Execute(ctx, "stop", nil, nil)
}

// Cont starts or resumes the guest's vCPUs (cont).
func (m *Monitor) Cont(ctx context.Context) error {
	return m.Execute(ctx, "cont", nil, nil)
}

// SystemReset resets the machine as if by its reset button (system_reset).
func (m *Monitor) SystemReset(ctx context.Context) error {
	return m.Execute(ctx, "system_reset", nil, nil)
}

// SystemPowerdown asks the guest to power off, like pressing the power
// button (system_powerdown). The guest may ignore it.
func (m *Monitor) SystemPowerdown(ctx context.Context) error {
	return m.Execute(ctx, "system_powerdown", nil, nil)
}

// Quit makes QEMU exit (quit) and waits, within ctx, until QEMU has closed
// the monitor connection. QEMU may close it before or instead of sending
// quit's response, so losing the connection counts as success, also when it
// was already lost. On success the Monitor is closed.
func (m *Monitor) Quit(ctx context.Context) error {
	if err := m.execute(ctx, "quit", nil, nil); err != nil && !errors.Is(err, ErrDisconnected) {
		return fmt.Errorf("qmp: quit: %w", err)
	}
	select {
	case <-m.done:
	case <-ctx.Done():
		return fmt.Errorf("qmp: quit: QEMU acknowledged but kept the connection open: %w", ctx.Err())
	}
	if err := m.terminalErr(); !errors.Is(err, ErrDisconnected) {
		return fmt.Errorf("qmp: quit: %w", err)
	}
	m.Close()
	return nil
}
