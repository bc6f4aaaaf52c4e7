package identitytest

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// CheckConsistent checks the state of a store (all identities and their labels) against the
// allocation rule of a, for a store no identity was ever deleted from: every label set has
// exactly one identity, and every identity is the first number of its set's probe sequence
// that does not hold another set (each earlier probe holds another set). Identities of other
// clusters and reserved ones are ignored. It returns every violation found, joined.
func CheckConsistent(a *identity.Allocator, all map[identity.Identity]identity.Labels) error {
	var errs []error
	byKey := make(map[string][]identity.Identity)
	for _, id := range slices.Sorted(maps.Keys(all)) {
		l := all[id]
		if id.IsReserved() || a.Probe(l, 0).Cluster() != id.Cluster() {
			continue
		}
		byKey[l.Key()] = append(byKey[l.Key()], id)
		if err := checkWalk(a, all, id, l); err != nil {
			errs = append(errs, err)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(byKey)) {
		if ids := byKey[k]; len(ids) > 1 {
			errs = append(errs, fmt.Errorf("set %s has %d identities: %v", k, len(ids), ids))
		}
	}
	return errors.Join(errs...)
}

// checkWalk walks l's probe sequence up to id; every probe before must hold another set.
func checkWalk(a *identity.Allocator, all map[identity.Identity]identity.Labels, id identity.Identity, l identity.Labels) error {
	for i := range identity.LocalSpace {
		p := a.Probe(l, i)
		if p == id {
			return nil
		}
		other, ok := all[p]
		if !ok {
			return fmt.Errorf("identity %s (%s): probe %d, %s, is free", id, l.Key(), i, p)
		}
		if other.Equal(l) {
			return fmt.Errorf("identity %s (%s): probe %d, %s, holds the same set", id, l.Key(), i, p)
		}
	}
	return fmt.Errorf("identity %s (%s) is not in its probe sequence", id, l.Key())
}
