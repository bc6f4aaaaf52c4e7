/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/* The uapi headers include <asm/posix_types.h>; a BPF target has no multiarch asm directory, so
 * this shim points at the generic definitions (the same on every 64-bit target). */
#include <asm-generic/posix_types.h>
