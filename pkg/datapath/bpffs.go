package datapath

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// MountBPFFS makes path a bpffs: it does nothing when path already is one, else it mounts a
// new bpffs there (mode 0700) and reports true. path must be an existing directory. It is
// idempotent; it is what the DaemonSet's init container runs on nodes whose host does not
// mount bpffs at /sys/fs/bpf at boot.
func MountBPFFS(path string) (mounted bool, err error) {
	st, err := os.Stat(path)
	if err != nil {
		return false, fmt.Errorf("mount bpffs: %w", err)
	}
	if !st.IsDir() {
		return false, fmt.Errorf("mount bpffs: %s is not a directory", path)
	}
	is, err := IsBPFFS(path)
	if err != nil {
		return false, err
	}
	if is {
		return false, nil
	}
	if err := unix.Mount("bpffs", path, "bpf", 0, "mode=0700"); err != nil {
		return false, fmt.Errorf("mount bpffs on %s: %w", path, err)
	}
	return true, nil
}

// IsBPFFS reports whether path is on a bpffs.
func IsBPFFS(path string) (bool, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return fs.Type == unix.BPF_FS_MAGIC, nil
}
