"""Numbers of the AHCI 1.3 register interface, SATA FISes, ATA and the SCSI
(MMC) commands an AHCI HBA model needs.

Values are those of the AHCI 1.3.1 specification, ACS-3 and MMC-6, under
the names FreeBSD's ``<sys/ata.h>`` and bhyve's ``ahci.h`` give them, so the
model reads like the documents it follows.  Nothing here has behaviour.
"""

from __future__ import annotations

# --- HBA layout -----------------------------------------------------------
MAX_PORTS = 32
MAX_SLOTS = 32
#: Port registers start here and repeat every AHCI_STEP bytes.
AHCI_OFFSET = 0x100
AHCI_STEP = 0x80
#: One command header in the command list.
AHCI_CL_SIZE = 32
#: The received-FIS area without FIS-based switching.
RFIS_SIZE = 256
#: Command table: CFIS (64) + ATAPI command (16) + reserved (48), then the PRDT.
CT_CFIS = 0x00
CT_ACMD = 0x40
CT_PRDT = 0x80
PRDT_ENTRY_SIZE = 16
#: PRD byte count field (bytes - 1).
DBCMASK = 0x3FFFFF

# --- generic host control -------------------------------------------------
AHCI_CAP = 0x00
AHCI_GHC = 0x04
AHCI_IS = 0x08
AHCI_PI = 0x0C
AHCI_VS = 0x10
AHCI_CCCC = 0x14
AHCI_CCCP = 0x18
AHCI_EM_LOC = 0x1C
AHCI_EM_CTL = 0x20
AHCI_CAP2 = 0x24

AHCI_CAP_SXS = 0x00000020
AHCI_CAP_NCS_SHIFT = 8
AHCI_CAP_PSC = 0x00002000
AHCI_CAP_SSC = 0x00004000
AHCI_CAP_PMD = 0x00008000
AHCI_CAP_ISS_SHIFT = 20
AHCI_CAP_SCLO = 0x01000000
AHCI_CAP_SAL = 0x02000000
AHCI_CAP_SALP = 0x04000000
AHCI_CAP_SSS = 0x08000000
AHCI_CAP_SMPS = 0x10000000
AHCI_CAP_SSNTF = 0x20000000
AHCI_CAP_SNCQ = 0x40000000
AHCI_CAP_64BIT = 0x80000000

AHCI_GHC_HR = 0x00000001
AHCI_GHC_IE = 0x00000002
AHCI_GHC_AE = 0x80000000

AHCI_CAP2_APST = 0x00000004
#: AHCI 1.3 in the VS register.
AHCI_VERSION = 0x00010300

# --- port registers (offsets within a port's 0x80 bytes) ------------------
P_CLB = 0x00
P_CLBU = 0x04
P_FB = 0x08
P_FBU = 0x0C
P_IS = 0x10
P_IE = 0x14
P_CMD = 0x18
P_TFD = 0x20
P_SIG = 0x24
P_SSTS = 0x28
P_SCTL = 0x2C
P_SERR = 0x30
P_SACT = 0x34
P_CI = 0x38
P_SNTF = 0x3C
P_FBS = 0x40
#: Register order of the readable port registers (0x1C is reserved).
PORT_REGS = ("clb", "clbu", "fb", "fbu", "is_", "ie", "cmd", None, "tfd", "sig",
             "ssts", "sctl", "serr", "sact", "ci", "sntf", "fbs")

P_IX_DHR = 0x00000001
P_IX_PS = 0x00000002
P_IX_DS = 0x00000004
P_IX_SDB = 0x00000008
P_IX_TFE = 0x40000000
#: PxIE bits that exist (bhyve's write mask).
P_IE_MASK = 0xFDC000FF

P_CMD_ST = 0x00000001
P_CMD_SUD = 0x00000002
P_CMD_POD = 0x00000004
P_CMD_CLO = 0x00000008
P_CMD_FRE = 0x00000010
P_CMD_CCS_MASK = 0x00001F00
P_CMD_CCS_SHIFT = 8
P_CMD_FR = 0x00004000
P_CMD_CR = 0x00008000
P_CMD_CPS = 0x00010000
P_CMD_APSTE = 0x00800000
P_CMD_ATAPI = 0x01000000
P_CMD_DLAE = 0x02000000
P_CMD_ALPE = 0x04000000
P_CMD_ASP = 0x08000000
P_CMD_ICC_MASK = 0xF0000000
#: PxCMD bits software may write.
P_CMD_WRITABLE = (P_CMD_ST | P_CMD_SUD | P_CMD_POD | P_CMD_CLO | P_CMD_FRE | P_CMD_APSTE
                  | P_CMD_ATAPI | P_CMD_DLAE | P_CMD_ALPE | P_CMD_ASP | P_CMD_ICC_MASK)

# SStatus / SControl.
SS_DET_NO_DEVICE = 0x0
SS_DET_PHY_ONLINE = 0x3
SS_SPD_MASK = 0xF0
SS_SPD_GEN3 = 0x40
SS_IPM_ACTIVE = 0x100
SC_DET_RESET = 0x1
SC_SPD_MASK = 0xF0

#: Signatures in PxSIG after a reset.
PXSIG_ATA = 0x00000101
PXSIG_ATAPI = 0xEB140101

# --- FIS types -------------------------------------------------------------
FIS_TYPE_REGH2D = 0x27
FIS_TYPE_REGD2H = 0x34
FIS_TYPE_PIOSETUP = 0x5F
FIS_TYPE_SETDEVBITS = 0xA1
#: Offsets in the received-FIS area.
RFIS_PSFIS = 0x20
RFIS_RFIS = 0x40
RFIS_SDBFIS = 0x58
#: The I (interrupt) bit in byte 1 of a device-to-host FIS; the C bit of H2D.
FIS_I = 0x40
FIS_C = 0x80
#: SRST in the device control byte (H2D byte 15).
ATA_A_RESET = 0x04

# --- ATA status / error ------------------------------------------------------
ATA_S_ERROR = 0x01
ATA_S_DRQ = 0x08
ATA_S_DSC = 0x10
ATA_S_DMA = 0x20
ATA_S_READY = 0x40
ATA_S_BUSY = 0x80
ATA_E_ABORT = 0x04
#: Interrupt reason bits bhyve puts into byte 4 of an ATAPI D2H FIS.
ATA_I_CMD = 0x01
ATA_I_IN = 0x02

# --- ATA commands --------------------------------------------------------------
ATA_NOP = 0x00
ATA_DATA_SET_MANAGEMENT = 0x06
ATA_DSM_TRIM = 0x01
ATA_READ = 0x20
ATA_READ48 = 0x24
ATA_READ_DMA48 = 0x25
ATA_READ_MUL48 = 0x29
ATA_READ_LOG_EXT = 0x2F
ATA_WRITE = 0x30
ATA_WRITE48 = 0x34
ATA_WRITE_DMA48 = 0x35
ATA_WRITE_MUL48 = 0x39
ATA_READ_VERIFY = 0x40
ATA_READ_VERIFY48 = 0x42
ATA_READ_LOG_DMA_EXT = 0x47
ATA_READ_FPDMA_QUEUED = 0x60
ATA_WRITE_FPDMA_QUEUED = 0x61
ATA_SEND_FPDMA_QUEUED = 0x64
ATA_SFPDMA_DSM = 0x00
ATA_PACKET_CMD = 0xA0
ATA_ATAPI_IDENTIFY = 0xA1
ATA_SMART_CMD = 0xB0
ATA_READ_MUL = 0xC4
ATA_WRITE_MUL = 0xC5
ATA_SET_MULTI = 0xC6
ATA_READ_DMA = 0xC8
ATA_WRITE_DMA = 0xCA
ATA_STANDBY_IMMEDIATE = 0xE0
ATA_IDLE_IMMEDIATE = 0xE1
ATA_STANDBY_CMD = 0xE2
ATA_IDLE_CMD = 0xE3
ATA_CHECK_POWER_MODE = 0xE5
ATA_SLEEP = 0xE6
ATA_FLUSHCACHE = 0xE7
ATA_FLUSHCACHE48 = 0xEA
ATA_ATA_IDENTIFY = 0xEC
ATA_SETFEATURES = 0xEF
ATA_SECURITY_FREEZE_LOCK = 0xF5

# SET FEATURES subcommands.
ATA_SF_ENAB_WCACHE = 0x02
ATA_SF_SETXFER = 0x03
ATA_SF_ENAB_SATA_SF = 0x10
ATA_SATA_SF_AN = 0x05
ATA_SF_DIS_RCACHE = 0x55
ATA_SF_DIS_WCACHE = 0x82
ATA_SF_ENAB_RCACHE = 0xAA

# Transfer modes.
ATA_PIO = 0x00
ATA_PIO0 = 0x08
ATA_WDMA0 = 0x20
ATA_UDMA0 = 0x40
ATA_UDMA6 = 0x46

#: Commands that read or write sectors through the PRDT.
ATA_RW_READ = frozenset({ATA_READ, ATA_READ48, ATA_READ_MUL, ATA_READ_MUL48, ATA_READ_DMA,
                         ATA_READ_DMA48, ATA_READ_FPDMA_QUEUED})
ATA_RW_WRITE = frozenset({ATA_WRITE, ATA_WRITE48, ATA_WRITE_MUL, ATA_WRITE_MUL48, ATA_WRITE_DMA,
                          ATA_WRITE_DMA48, ATA_WRITE_FPDMA_QUEUED})
ATA_RW_48 = frozenset({ATA_READ48, ATA_WRITE48, ATA_READ_MUL48, ATA_WRITE_MUL48,
                       ATA_READ_DMA48, ATA_WRITE_DMA48})
ATA_NCQ = frozenset({ATA_READ_FPDMA_QUEUED, ATA_WRITE_FPDMA_QUEUED, ATA_SEND_FPDMA_QUEUED})
#: Accepted and completed at once (power management, verify).
ATA_NOOPS = frozenset({ATA_STANDBY_CMD, ATA_STANDBY_IMMEDIATE, ATA_IDLE_CMD, ATA_IDLE_IMMEDIATE,
                       ATA_SLEEP, ATA_READ_VERIFY, ATA_READ_VERIFY48})

# --- SCSI / MMC --------------------------------------------------------------------
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY = 0x25
READ_10 = 0x28
READ_TOC = 0x43
GET_EVENT_STATUS_NOTIFICATION = 0x4A
MODE_SENSE_10 = 0x5A
REPORT_LUNS = 0xA0
READ_12 = 0xA8

MODEPAGE_RW_ERROR_RECOVERY = 0x01
MODEPAGE_CD_CAPABILITIES = 0x2A

ATA_SENSE_NO_SENSE = 0x0
ATA_SENSE_ILLEGAL_REQUEST = 0x5
#: Additional sense codes bhyve reports.
ASC_INVALID_OPCODE = 0x20
ASC_LBA_OUT_OF_RANGE = 0x21
ASC_INVALID_FIELD = 0x24
ASC_SAVING_NOT_SUPPORTED = 0x39
ASC_REMOVAL_PREVENTED = 0x53

#: CD-ROM block size (bhyve's ATAPI model always uses 2048).
CD_BLOCK = 2048
