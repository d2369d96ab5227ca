/* Everything a guest program normally needs, in one include. */
#ifndef GUEST_H
#define GUEST_H

#include "acpi.h"
#include "intr.h"
#include "io.h"
#include "mmu.h"
#include "pci.h"
#include "serial.h"
#include "util.h"

#endif
