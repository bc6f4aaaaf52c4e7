package wgtest

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

var _ wireguard.Device = (*Device)(nil)

// Device is a fake wireguard.Device backed by a [Model]. Apply plans with
// wireguard.Diff exactly as the real devices do, so tests of callers see the
// same PlanStats and can inspect every configuration sent (Model.Configs).
// Its methods are safe for concurrent use.
type Device struct {
	// Model is the device state; it is never replaced.
	Model *Model

	name    string
	backend wireguard.Backend

	mu       sync.Mutex
	applyErr error
	stats    []wireguard.PlanStats
	closed   bool
	deleted  bool
}

// NewDevice returns an empty fake device.
func NewDevice(name string, backend wireguard.Backend) *Device {
	typ := wgtypes.LinuxKernel
	if backend == wireguard.BackendUserspace {
		typ = wgtypes.Userspace
	}
	return &Device{Model: NewModel(name, typ), name: name, backend: backend}
}

// FailApply makes every later Apply fail with err (nil: succeed again).
func (d *Device) FailApply(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applyErr = err
}

// Stats returns the PlanStats of every successful Apply, oldest first.
func (d *Device) Stats() []wireguard.PlanStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]wireguard.PlanStats(nil), d.stats...)
}

// Closed reports whether Close or Delete was called.
func (d *Device) Closed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closed
}

// Deleted reports whether Delete was called.
func (d *Device) Deleted() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.deleted
}

// String returns the Model's state.
func (d *Device) String() string { return d.Model.String() }

// Name implements wireguard.Device.
func (d *Device) Name() string { return d.name }

// Backend implements wireguard.Device.
func (d *Device) Backend() wireguard.Backend { return d.backend }

// Apply implements wireguard.Device.
func (d *Device) Apply(ctx context.Context, cfg wireguard.Config) (wireguard.PlanStats, error) {
	if err := cfg.Validate(); err != nil {
		return wireguard.PlanStats{}, fmt.Errorf("apply WireGuard config to %s: %w", d.name, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(ctx); err != nil {
		return wireguard.PlanStats{}, err
	}
	if d.applyErr != nil {
		return wireguard.PlanStats{}, d.applyErr
	}
	wcfg, stats := wireguard.Diff(d.Model.Device(), cfg)
	if stats.Changed() {
		if err := d.Model.Configure(wcfg); err != nil {
			return wireguard.PlanStats{}, err
		}
	}
	d.stats = append(d.stats, stats)
	return stats, nil
}

// Device implements wireguard.Device.
func (d *Device) Device(ctx context.Context) (*wgtypes.Device, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(ctx); err != nil {
		return nil, err
	}
	return d.Model.Device(), nil
}

// Close implements wireguard.Device.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	return nil
}

// Delete implements wireguard.Device: the model is emptied.
func (d *Device) Delete(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(ctx); err != nil {
		return err
	}
	d.deleted, d.closed = true, true
	d.Model.Reset()
	return nil
}

func (d *Device) usable(ctx context.Context) error {
	if d.closed {
		return errors.New("wgtest: device handle closed")
	}
	return ctx.Err()
}
