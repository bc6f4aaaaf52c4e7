package wireguard

import "testing"

func TestTunnelMTU(t *testing.T) {
	tests := []struct {
		name     string
		underlay int
		want     int
	}{
		{"ethernet", 1500, 1420},
		{"jumbo", 9000, 8920},
		{"gcp", 1460, 1380},
		{"aws jumbo", 9001, 8921},
		{"smallest usable", 1360, 1280},
		{"too small", 1359, 0},
		{"zero", 0, 0},
		{"negative", -1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := TunnelMTU(tt.underlay); got != tt.want {
				t.Errorf("TunnelMTU(%d) = %d, want %d", tt.underlay, got, tt.want)
			}
		})
	}
}

func TestOverheads(t *testing.T) {
	if OverheadIPv6 != 80 || OverheadIPv4 != 60 || Overhead != OverheadIPv6 {
		t.Errorf("overheads v4=%d v6=%d worst=%d, want 60, 80, 80", OverheadIPv4, OverheadIPv6, Overhead)
	}
	// A full-size inner packet fits one underlay packet over either family.
	for _, underlay := range []int{1500, 9000} {
		inner := TunnelMTU(underlay)
		if inner+OverheadIPv6 > underlay || inner+OverheadIPv4 > underlay {
			t.Errorf("underlay %d: inner %d does not fit", underlay, inner)
		}
	}
	if DefaultTunnelMTU != 1420 {
		t.Errorf("DefaultTunnelMTU = %d, want 1420 (wireguard-go's default)", DefaultTunnelMTU)
	}
}
