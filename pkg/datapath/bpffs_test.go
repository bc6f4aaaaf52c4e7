package datapath

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMountBPFFS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting bpffs needs root")
	}
	dir := t.TempDir()
	if is, err := IsBPFFS(dir); err != nil || is {
		t.Fatalf("IsBPFFS(fresh dir) = %v, %v; want false, nil", is, err)
	}
	mounted, err := MountBPFFS(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	if !mounted {
		t.Fatal("MountBPFFS on a plain directory reported nothing mounted")
	}
	if is, err := IsBPFFS(dir); err != nil || !is {
		t.Fatalf("after MountBPFFS: IsBPFFS = %v, %v; want true", is, err)
	}
	// Idempotent: a second call mounts nothing more (one unmount above must clear it).
	if mounted, err := MountBPFFS(dir); err != nil || mounted {
		t.Fatalf("second MountBPFFS = %v, %v; want false, nil", mounted, err)
	}
	if _, err := MountBPFFS(filepath.Join(dir, "missing")); err == nil {
		t.Error("MountBPFFS on a missing path succeeded")
	}
}
