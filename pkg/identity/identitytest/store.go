package identitytest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

var _ identity.Store = (*Store)(nil)

// Calls counts a Store's method calls.
type Calls struct {
	Get, Create, List, Delete int
}

// Store is an in-memory identity.Store: a map guarded by a mutex, so Create is atomic as the
// API server's create is. Its methods are safe for concurrent use.
type Store struct {
	mu    sync.Mutex
	ids   map[identity.Identity]identity.Labels
	calls Calls
	err   error
	hook  func(op string, id identity.Identity)
}

// NewStore returns an empty Store.
func NewStore() *Store {
	return &Store{ids: make(map[identity.Identity]identity.Labels)}
}

// Fail makes every later call fail with err (nil: succeed again).
func (s *Store) Fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

// SetHook installs f, called (without the Store's lock) at the start of every Get, Create and
// Delete with the operation's name ("get", "create", "delete") and identity; tests use it to
// interleave operations. nil removes it.
func (s *Store) SetHook(f func(op string, id identity.Identity)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hook = f
}

func (s *Store) enter(op string, id identity.Identity) error {
	s.mu.Lock()
	hook := s.hook
	s.mu.Unlock()
	if hook != nil {
		hook(op, id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch op {
	case "get":
		s.calls.Get++
	case "create":
		s.calls.Create++
	case "delete":
		s.calls.Delete++
	}
	return s.err
}

// Get implements identity.Store.
func (s *Store) Get(ctx context.Context, id identity.Identity) (identity.Labels, bool, error) {
	if err := s.enter("get", id); err != nil {
		return identity.Labels{}, false, err
	}
	if err := ctx.Err(); err != nil {
		return identity.Labels{}, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.ids[id]
	return l, ok, nil
}

// Create implements identity.Store.
func (s *Store) Create(ctx context.Context, id identity.Identity, labels identity.Labels) (bool, error) {
	if err := s.enter("create", id); err != nil {
		return false, err
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.ids[id]; ok {
		return cur.Equal(labels), nil
	}
	s.ids[id] = labels
	return true, nil
}

// List implements identity.Store.
func (s *Store) List(ctx context.Context) (map[identity.Identity]identity.Labels, error) {
	s.mu.Lock()
	s.calls.List++
	err := s.err
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return s.Snapshot(), nil
}

// Delete removes id, as the garbage collector would. It reports whether id existed.
func (s *Store) Delete(id identity.Identity) bool {
	if s.enter("delete", id) != nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.ids[id]
	delete(s.ids, id)
	return ok
}

// Put sets id to labels unconditionally, as an administrator might.
func (s *Store) Put(id identity.Identity, labels identity.Labels) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ids[id] = labels
}

// Snapshot returns a copy of the contents.
func (s *Store) Snapshot() map[identity.Identity]identity.Labels {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.ids)
}

// Len returns the number of identities.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.ids)
}

// Calls returns the call counts so far.
func (s *Store) Calls() Calls {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// String prints the contents sorted by identity, one "identity labels-key" line each.
func (s *Store) String() string {
	snap := s.Snapshot()
	ids := slices.Sorted(maps.Keys(snap))
	var b strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&b, "%s %s\n", id, snap[id].Key())
	}
	return b.String()
}
