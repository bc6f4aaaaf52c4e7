/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/* The uapi headers include <asm/byteorder.h>; a BPF target has no multiarch asm directory, so
 * this shim points at the generic definitions (the same on every 64-bit target). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#include <linux/byteorder/little_endian.h>
#else
#include <linux/byteorder/big_endian.h>
#endif
