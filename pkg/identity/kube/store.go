package kube

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

var _ identity.Store = (*Store)(nil)

// listPage is the page size of List (a variable for tests).
var listPage int64 = 500

// createAttempts bounds Create's retries when the object it collided with is deleted before
// it could be read.
const createAttempts = 3

// Store is an identity.Store over MeshIdentity objects. Its methods are safe for concurrent
// use.
type Store struct {
	c client.Client
}

// NewStore returns a Store using c, whose scheme must know v1alpha1 and which must read through
// to the API server. It does no I/O.
func NewStore(c client.Client) *Store { return &Store{c: c} }

// Object returns the MeshIdentity for id and labels.
func Object(id identity.Identity, labels identity.Labels) *v1alpha1.MeshIdentity {
	return &v1alpha1.MeshIdentity{
		ObjectMeta: metav1.ObjectMeta{Name: id.String()},
		Spec:       v1alpha1.MeshIdentitySpec{Labels: labels.Map()},
	}
}

// FromObject returns the identity and labels a MeshIdentity holds. It fails only if the name
// is not an identity; labels are taken as they are (identity.FromMap).
func FromObject(mi *v1alpha1.MeshIdentity) (identity.Identity, identity.Labels, error) {
	id, err := identity.Parse(mi.Name)
	if err != nil {
		return 0, identity.Labels{}, fmt.Errorf("meshidentity %q: %w", mi.Name, err)
	}
	return id, identity.FromMap(mi.Spec.Labels), nil
}

// Get implements identity.Store.
func (s *Store) Get(ctx context.Context, id identity.Identity) (identity.Labels, bool, error) {
	var mi v1alpha1.MeshIdentity
	err := s.c.Get(ctx, client.ObjectKey{Name: id.String()}, &mi)
	switch {
	case apierrors.IsNotFound(err):
		return identity.Labels{}, false, nil
	case err != nil:
		return identity.Labels{}, false, fmt.Errorf("get meshidentity %s: %w", id, err)
	}
	return identity.FromMap(mi.Spec.Labels), true, nil
}

// Create implements identity.Store: create, and on AlreadyExists read the object back and
// compare labels.
func (s *Store) Create(ctx context.Context, id identity.Identity, labels identity.Labels) (bool, error) {
	for range createAttempts {
		err := s.c.Create(ctx, Object(id, labels))
		if err == nil {
			return true, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return false, fmt.Errorf("create meshidentity %s: %w", id, err)
		}
		cur, ok, err := s.Get(ctx, id)
		if err != nil {
			return false, err
		}
		if ok {
			return cur.Equal(labels), nil
		}
		// Deleted between our create and our read: the number is free again, try again.
	}
	return false, fmt.Errorf("create meshidentity %s: %w", id, errChurn)
}

var errChurn = errors.New("deleted and re-created repeatedly while creating")

// List implements identity.Store. Objects whose name is not an identity are left out.
func (s *Store) List(ctx context.Context) (map[identity.Identity]identity.Labels, error) {
	out := make(map[identity.Identity]identity.Labels)
	err := listAll(ctx, s.c, func(mi *v1alpha1.MeshIdentity) {
		if id, l, err := FromObject(mi); err == nil {
			out[id] = l
		}
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// listAll lists every MeshIdentity in pages, calling f for each.
func listAll(ctx context.Context, c client.Client, f func(*v1alpha1.MeshIdentity)) error {
	opts := []client.ListOption{client.Limit(listPage)}
	for {
		var list v1alpha1.MeshIdentityList
		if err := c.List(ctx, &list, opts...); err != nil {
			return fmt.Errorf("list meshidentities: %w", err)
		}
		for i := range list.Items {
			f(&list.Items[i])
		}
		if list.Continue == "" {
			return nil
		}
		opts = []client.ListOption{client.Limit(listPage), client.Continue(list.Continue)}
	}
}
