package identitytest_test

import (
	"strings"
	"testing"

	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/pkg/identity/identitytest"
)

func set(t *testing.T, app string) identity.Labels {
	t.Helper()
	l, err := identity.Canonical(map[string]string{"app": app}, "n", "", "c")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestCheckConsistent(t *testing.T) {
	// A space of 2 makes any two sets consistent when they hold both numbers.
	a := identity.NewAllocator(identitytest.NewStore(), identity.AllocatorOptions{Space: 2})
	x, y := set(t, "x"), set(t, "y")
	tests := []struct {
		name    string
		state   map[identity.Identity]identity.Labels
		wantErr string
	}{
		{"empty", nil, ""},
		{"second choice behind another set", map[identity.Identity]identity.Labels{a.Probe(x, 0): y, a.Probe(x, 1): x}, ""},
		{"reserved ignored", map[identity.Identity]identity.Labels{identity.Host: x, a.Probe(x, 0): x}, ""},
		{"second choice behind a hole", map[identity.Identity]identity.Labels{a.Probe(x, 1): x}, "is free"},
		{"duplicate", map[identity.Identity]identity.Labels{a.Probe(x, 0): x, a.Probe(x, 1): x}, "holds the same set"},
		{"outside the sequence", map[identity.Identity]identity.Labels{identity.New(0, 1000): x}, "is free"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := identitytest.CheckConsistent(a, tt.state)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("CheckConsistent = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestStoreString(t *testing.T) {
	s := identitytest.NewStore()
	s.Put(identity.New(0, 900), set(t, "b"))
	s.Put(identity.New(0, 300), set(t, "a"))
	want := "300 app=a;meshcrypt.io/cluster=c;meshcrypt.io/namespace=n;meshcrypt.io/serviceaccount=default\n" +
		"900 app=b;meshcrypt.io/cluster=c;meshcrypt.io/namespace=n;meshcrypt.io/serviceaccount=default\n"
	if got := s.String(); got != want {
		t.Errorf("String =\n%s\nwant\n%s", got, want)
	}
	if !s.Delete(identity.New(0, 300)) || s.Delete(identity.New(0, 300)) || s.Len() != 1 {
		t.Error("Delete")
	}
}
