package identity

import (
	"errors"
	"testing"
)

func TestIdentityLayout(t *testing.T) {
	tests := []struct {
		cluster  uint8
		local    uint16
		want     Identity
		str      string
		reserved bool
	}{
		{0, 1, Host, "1", true},
		{0, 6, RemoteNode, "6", true},
		{0, 255, 255, "255", true},
		{0, 256, 256, "256", false},
		{0, 65535, 65535, "65535", false},
		{1, 256, 65792, "65792", false},
		{1, 1, 65537, "65537", true},
		{255, 65535, 16777215, "16777215", false},
	}
	for _, tt := range tests {
		id := New(tt.cluster, tt.local)
		if id != tt.want || id.Cluster() != tt.cluster || id.Local() != tt.local {
			t.Errorf("New(%d, %d) = %d (cluster %d, local %d), want %d", tt.cluster, tt.local, id, id.Cluster(), id.Local(), tt.want)
		}
		if id.String() != tt.str {
			t.Errorf("%d.String() = %q, want %q", id, id.String(), tt.str)
		}
		if id.IsReserved() != tt.reserved {
			t.Errorf("%d.IsReserved() = %v, want %v", id, id.IsReserved(), tt.reserved)
		}
		back, err := Parse(tt.str)
		if err != nil || back != id {
			t.Errorf("Parse(%q) = %d, %v; want %d", tt.str, back, err, id)
		}
	}
	for _, c := range []Identity{Host, World, Unmanaged, Health, Init, RemoteNode} {
		if !c.IsReserved() || c.Cluster() != 0 {
			t.Errorf("%d is not a reserved identity of cluster 0", c)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for _, s := range []string{"", "0", "01", "-1", "+1", " 1", "1 ", "4294967296", "99999999999", "1e3", "0x10", "12a"} {
		if id, err := Parse(s); !errors.Is(err, ErrInvalidIdentity) {
			t.Errorf("Parse(%q) = %d, %v; want ErrInvalidIdentity", s, id, err)
		}
	}
	if id, err := Parse("4294967295"); err != nil || id != 1<<32-1 {
		t.Errorf("Parse(max) = %d, %v", id, err)
	}
}
