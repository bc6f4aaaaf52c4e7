package ipsec_test

import (
	"errors"
	"io/fs"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
)

func TestParseXfrmStat(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    map[string]uint64
		wantErr string
	}{
		{name: "empty", in: "", want: map[string]uint64{}},
		{name: "kernel format", in: "XfrmInError             \t3\nXfrmOutNoStates         \t0\n", want: map[string]uint64{"XfrmInError": 3, "XfrmOutNoStates": 0}},
		{name: "blank lines", in: "\nXfrmInError 1\n\n", want: map[string]uint64{"XfrmInError": 1}},
		{name: "max", in: "XfrmInError 18446744073709551615", want: map[string]uint64{"XfrmInError": 18446744073709551615}},
		{name: "no value", in: "XfrmInError\n", wantErr: "line 1: want NAME VALUE"},
		{name: "extra field", in: "XfrmInError 1 2\n", wantErr: "line 1: want NAME VALUE"},
		{name: "negative", in: "XfrmInError 0\nXfrmOutError -1\n", wantErr: "line 2"},
		{name: "overflow", in: "XfrmInError 18446744073709551616", wantErr: "line 1: counter XfrmInError: value is not a number"},
		{name: "duplicate", in: "XfrmInError 1\nXfrmInError 2\n", wantErr: "XfrmInError repeated"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ipsec.ParseXfrmStat([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// The file read from a real kernel (6.18) parses, with the fields IPsec troubleshooting
// looks at; a missing file is reported as such.
func TestReadXfrmStatFile(t *testing.T) {
	got, err := ipsec.ReadXfrmStat("testdata/xfrm_stat")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"XfrmInError", "XfrmInNoStates", "XfrmInStateProtoError", "XfrmOutNoStates", "XfrmOutStateExpired"} {
		if _, ok := got[f]; !ok {
			t.Errorf("field %s missing", f)
		}
	}
	if _, err := ipsec.ReadXfrmStat("testdata/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: err = %v, want not-exist", err)
	}
}

func FuzzParseXfrmStat(f *testing.F) {
	f.Add("XfrmInError             \t3\nXfrmOutNoStates         \t0\n")
	f.Add("XfrmInError 1 2\n")
	f.Add("XfrmInError 1\nXfrmInError 2\n")
	f.Add("\n\n")
	f.Fuzz(func(t *testing.T, in string) {
		got, err := ipsec.ParseXfrmStat([]byte(in))
		if err != nil {
			return
		}
		// Whatever parses has one entry per non-blank line, with names free of blanks.
		lines := 0
		for l := range strings.Lines(in) {
			if strings.TrimSpace(l) != "" {
				lines++
			}
		}
		if lines != len(got) {
			t.Fatalf("%d non-blank lines, %d fields", lines, len(got))
		}
		for name := range got {
			if name == "" || strings.ContainsAny(name, " \t\n") {
				t.Fatalf("bad field name %q", name)
			}
		}
	})
}
