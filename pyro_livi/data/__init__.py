"""Data: reading and validating AnnData/MuData, donor index, minibatches."""

from pyro_livi.data.batch import Batch
from pyro_livi.data.donor_index import DonorIndex
from pyro_livi.data.expression import SingleCellDataset, read_dataset
from pyro_livi.data.loader import MinibatchLoader
from pyro_livi.data.spec import DatasetSpec
from pyro_livi.data.genotypes import (Genotypes, match_donors, quality_control, read_dosage_table,
                                      read_genotypes, read_plink)
from pyro_livi.data.kinship import kinship_from_genotypes, read_kinship, validate_kinship
